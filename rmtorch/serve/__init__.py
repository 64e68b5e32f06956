"""rmtorch.serve: a reward-model HTTP server for RL clusters, and `RemoteScorer`, its client.

    python -m rmtorch.serve --model outputs/reward_model            # 127.0.0.1:8000; --help lists the options
    scorer = RemoteScorer("http://127.0.0.1:8000")                 # RewardScorer's call, over HTTP
    rewards = scorer(prompts, completions)

Endpoints: `POST /score` (rmtorch's own formatting, or token ids), `POST /get_reward` (OpenRLHF's
`--remote_rm_url`), `POST /classify` (vLLM's, as verl's reward loop calls it), `GET /health`, `GET /metrics`
(Prometheus). One model worker scores what concurrent requests leave in its queue in shared packed forwards, rows
sharing a token prefix computing it once, and every reward equals the row scored alone. Layout: `app` (HTTP),
`batcher` (the queue and the model worker), `metrics`, `client`, `__main__` (the command). docs/serve.md has the
deployment notes.
"""

from rmtorch.serve.client import RemoteScorer, ServerAnswerError

__all__ = ["RemoteScorer", "ServerAnswerError"]
