"""python -m rmtorch.serve: serve a reward model over HTTP (see rmtorch.serve and docs/serve.md).

    python -m rmtorch.serve --model outputs/reward_model --port 8000 --max_tokens_per_batch 16384
    python -m rmtorch.serve --model outputs/reward_model --engine vllm     # vLLM computes the rewards
    python -m rmtorch.serve --help

SIGTERM (or Ctrl-C) stops taking connections, answers the requests in flight, then exits.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys

import torch
import uvicorn

from rmtorch.cli import run, set_cpu_threads
from rmtorch.config import ServeConfig, parse_config, scoring_source, trained_defaults
from rmtorch.normalize import RewardNormalizer
from rmtorch.score import RewardScorer
from rmtorch.serve.app import build_app, exposure_warning

DESCRIPTION = "Serve a reward model over HTTP for RL clusters: OpenRLHF, verl (vLLM's /classify), RemoteScorer."
logger = logging.getLogger("rmtorch.serve")


def load_config(argv: list[str] | None) -> ServeConfig:
    cfg = parse_config(argv, ServeConfig, description=DESCRIPTION)
    # Score the way the model was trained (its run's max_length, bf16, ...), the command line still first. Packing
    # changes speed, not rewards: the server packs unless told not to.
    trained = {k: v for k, v in trained_defaults(cfg.model, ServeConfig).items() if k != "packing"}
    if trained:
        cfg = parse_config(argv, ServeConfig, base=trained, description=DESCRIPTION)
    cfg.engine_options()  # refused before the model loads
    return dataclasses.replace(cfg, api_key=cfg.api_key or os.environ.get("RMTORCH_SERVE_API_KEY"))


def build_scorer(cfg: ServeConfig) -> RewardScorer:
    """The scorer behind the endpoints, loaded and set up as `cfg` says (threads, device, precision, lengths,
    engine). With the vllm engine, vLLM places the model and batches a call's rows itself."""
    options = dict(
        max_length=cfg.max_length, max_tokens_per_batch=cfg.max_tokens_per_batch,
        trust_remote_code=cfg.trust_remote_code, autocast_dtype=torch.bfloat16 if cfg.bf16 else None,
        engine=cfg.engine, engine_options=cfg.engine_options(),
    )  # fmt: skip
    if cfg.engine == "vllm":
        return RewardScorer.from_pretrained(cfg.model, device=cfg.device, **options)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    set_cpu_threads(cfg.cpu_threads, device)
    return RewardScorer.from_pretrained(cfg.model, device=device, packing=cfg.packing, **options)


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    normalizer = RewardNormalizer.load(cfg.normalize) if cfg.normalize else None  # checked before the model loads
    if warning := exposure_warning(cfg.host, cfg.api_key):
        logger.warning(warning)
    scorer = build_scorer(cfg)
    logger.info(
        "scoring %s with the %s engine in %s, max_length %s (from %s)",
        cfg.model, scorer.engine.name, scorer.precision, scorer.max_length, scoring_source(cfg.model),
    )  # fmt: skip
    # timeout_graceful_shutdown=None: on SIGTERM the requests in flight are answered, however long they take.
    uvicorn.run(build_app(scorer, cfg, normalizer), host=cfg.host, port=cfg.port, timeout_graceful_shutdown=None)


if __name__ == "__main__":
    run(main, sys.argv[1:])
