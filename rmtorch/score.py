"""The scorer RL code imports: reward of (prompt, completion) rows, formatted exactly as training formatted them.

    scorer = RewardScorer.from_pretrained("outputs/rm")
    rewards = scorer(prompts, completions)            # (N,) fp32, input order
    trainer = GRPOTrainer(..., reward_funcs=[scorer.as_reward_func(name="rm")])

Formatting: every row goes through `rmtorch.formatting.tokenize_response`, the function training uses, so the ids are
the ids the model was trained on (TRL's GRPO scores standard text without the BOS/EOS its RewardTrainer trained
with; rmtorch does not).

Batching is `rmtorch.model.compute_rewards`: by default rows that share a prompt (GRPO's num_generations
completions) are packed into one padding-free row as [prompt, completion 1, completion 2, ...], the prompt
computed once; `packing=False` sorts rows by length and pads micro-batches (left or right). Either way every
reward equals the row scored alone (fp32, ~1e-6), and the caller's model is left as it was given.

Engines (`rmtorch.engines`): that forward is the "torch" engine, the default. `engine="vllm"` hands the same
formatted ids to vLLM's pooling engine instead (several GPUs, tensor parallelism, vLLM's kernels; vLLM installed):

    scorer = RewardScorer.from_pretrained("outputs/rm", engine="vllm", engine_options={"tensor_parallel_size": 2})

Truncation: a row longer than `max_length` (default: the model's max_position_embeddings) keeps its end: tokens
are cut from the left (after a leading BOS the tokenizer adds, which is kept). Such rows are counted in a logged
warning and flagged in `ScoreDetails.truncated`.

Text the chat template leaves out: some templates render only part of an assistant message (Qwen3's keeps
the text before the first and after the last `</think>`, so text between two `</think>` is never scored). A
policy could hide text from the reward model that way. Such rows are flagged in `ScoreDetails.dropped_text`
and logged; `dropped_text="error"` refuses them instead. RL code should refuse or penalise flagged rows.

Empty completions are scored, not refused: RL policies do emit them, and training's format for an empty
response is defined (standard text: prompt + EOS; conversations: an empty assistant turn).

A rating model (`train.py --objective regression`) gives one reward a row too: the weighted sum of its attributes
by the weights its config holds; `return_details=True` adds the attributes themselves, (N, K).

The scorer returns raw rewards. Scaling for RL is the caller's, e.g. `as_reward_func(transform=RewardNormalizer())`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import torch

from rmtorch.config import scoring_defaults
from rmtorch.engines import ENGINES, TorchEngine, VllmEngine, check_vllm_model
from rmtorch.formatting import bos_to_keep, chat_text, common_prefix_length, keep_last, prompt_ids, tokenize_response
from rmtorch.loading import load_reward_model, resolve_pad_token
from rmtorch.model import RewardModel, lock_of
from rmtorch.pairs import check_messages
from rmtorch.ratings import weighted_reward
from rmtorch.thinking import SplitCompletions, resolve_think_tokens, split_rows

logger = logging.getLogger(__name__)


@dataclass
class ScoreDetails:
    """What `RewardScorer(..., return_details=True)` returns; every field is (N,) in input order."""

    rewards: torch.Tensor  # fp32
    num_tokens: torch.Tensor  # int64, tokens scored (after truncation)
    truncated: torch.Tensor  # bool, longer than max_length: the start was cut
    unclosed_think: torch.Tensor | None  # bool, a <think> with no </think> after it (None: rows not split)
    dropped_text: torch.Tensor  # bool, the chat template left text of the completion out of the scored ids
    attributes: torch.Tensor | None = None  # (N, K) fp32 of a rating model (names: config.id2label); else None


class RewardScorer:
    """Scores (prompt, completion) rows with a sequence-classification reward model; see the module docstring.

    The model runs in eval mode for each call and gets its previous mode back; its attention implementation,
    config and tokenizer are not changed. Safe to share between threads: one thread at a time uses the tokenizer, and
    one the model (through any of its scorers); every call gets the rewards it gets alone.

    engine: "torch" (`model` is the loaded model, scored by `compute_rewards`) or "vllm" (`model` is the model
    directory, which vLLM loads: see `rmtorch.engines.VllmEngine`; packing, padding_side and the forward's size are
    then vLLM's, and autocast_dtype bf16 runs vLLM in bfloat16, else float32). engine_options go to the engine
    (for vllm: `vllm.LLM`'s, e.g. tensor_parallel_size).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_length: int | None = None,
        max_tokens_per_batch: int = 16384,
        packing: bool = True,
        padding_side: str = "right",
        autocast_dtype: torch.dtype | None = None,
        think_start_token: str | int | None = "<think>",
        think_end_token: str | int | None = "</think>",
        dropped_text: str = "flag",
        engine: str = "torch",
        engine_options: dict | None = None,
    ):
        if engine not in ENGINES:
            raise ValueError(f"engine must be {' or '.join(map(repr, ENGINES))}, got {engine!r}.")
        if dropped_text not in ("flag", "error"):
            raise ValueError(f"dropped_text must be 'flag' or 'error', got {dropped_text!r}.")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
        if max_tokens_per_batch < 1:
            raise ValueError(f"max_tokens_per_batch must be a positive number of tokens, got {max_tokens_per_batch}.")
        self.tokenizer = tokenizer
        self.max_tokens_per_batch = max_tokens_per_batch  # also the server's budget of tokens per engine call
        if engine == "torch" and engine_options:
            raise ValueError(f"engine_options {sorted(engine_options)} are for engine 'vllm' (vllm.LLM's options).")
        if engine == "torch":
            self.model, self.reward_model, self.config = model, RewardModel(model), model.config
            self.vocab_size = model.get_input_embeddings().num_embeddings
            # The pad id only fills masked positions (pooling and positions follow the mask), so any valid id works.
            pad_token_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
            self.engine = TorchEngine(
                self.reward_model, pad_token_id, packing, max_tokens_per_batch, padding_side, autocast_dtype
            )
        else:
            from transformers import AutoConfig

            options = dict(engine_options or {})
            check_vllm_model(model)  # before vLLM starts: a LoRA adapter gets its fix
            self.model = self.reward_model = None  # vLLM holds the model, in its own process
            self.config = AutoConfig.from_pretrained(model, trust_remote_code=options.get("trust_remote_code", False))
            self.vocab_size = self.config.vocab_size
            dtypes = {None: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
            self.engine = VllmEngine(model, dtype=dtypes[autocast_dtype], **options)
        # None: the model's own limit (rmtorch.model.model_max_length's rule, on the config both engines have)
        self.max_length = (
            max_length if max_length is not None else getattr(self.config, "max_position_embeddings", None)
        )
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens, got {self.max_length}.")
        self.think = resolve_think_tokens(tokenizer, think_start_token, think_end_token)
        self.think_end_token = think_end_token
        self.bos_id = bos_to_keep(tokenizer)  # a cut from the left keeps it
        self.dropped_text = dropped_text
        self.reward_weights = rating_weights(self.config)
        # a rating model's attributes by name, in the order of its outputs (config.id2label); None otherwise
        self.attribute_names = None
        if self.reward_weights is not None:
            self.attribute_names = [self.config.id2label[k] for k in range(len(self.reward_weights))]

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        max_length: int | None = None,
        max_tokens_per_batch: int = 16384,
        trust_remote_code: bool = False,
        engine: str = "torch",
        engine_options: dict | None = None,
        **kwargs,
    ) -> RewardScorer:
        """Load a trained reward model directory (or 'smollm2', a .gguf file) with its tokenizer.

        Precision and max_length follow `rmtorch.config.scoring_defaults`, the rule score.py, evaluate.py and
        rmtorch.serve use too: a train.py run scores as it trained (its config.yaml: bf16 autocast and max_length
        512 by default), any other model in fp32 up to its own limit. `autocast_dtype=` (None: fp32) and
        `max_length=` override it. device defaults to CUDA when available, else CPU. Other keyword arguments go to
        `RewardScorer(...)`.

        engine="vllm": vLLM loads the directory itself (a train.py run or merge_lora.py's output; a LoRA adapter is
        refused with the merge command), in vLLM dtype bfloat16 where the rule says bf16, else float32; its devices
        are vLLM's (`device` must stay None; engine_options={"tensor_parallel_size": N} spreads it over N GPUs).
        """
        if engine not in ENGINES:
            raise ValueError(f"engine must be {' or '.join(map(repr, ENGINES))}, got {engine!r}.")
        defaults = scoring_defaults(str(path))
        if max_length is None:
            max_length = defaults["max_length"]
        kwargs.setdefault("autocast_dtype", torch.bfloat16 if defaults["bf16"] else None)
        options = dict(max_length=max_length, max_tokens_per_batch=max_tokens_per_batch, engine=engine, **kwargs)
        if engine == "vllm":
            if device is not None:
                raise ValueError(
                    f"device={device!r} with engine vllm: vLLM places the model itself. Leave device unset and choose "
                    "GPUs with CUDA_VISIBLE_DEVICES (and tensor_parallel_size in engine_options)."
                )
            from transformers import AutoTokenizer

            check_vllm_model(path)  # before anything loads
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            resolve_pad_token(tokenizer)
            engine_options = {"trust_remote_code": trust_remote_code, **(engine_options or {})}
            return cls(str(path), tokenizer, engine_options=engine_options, **options)
        model, tokenizer = load_reward_model(path, dtype=dtype, trust_remote_code=trust_remote_code)
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(model.eval(), tokenizer, engine_options=engine_options, **options)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The forward's precision: torch's autocast dtype (None: fp32), or what vLLM's dtype stands for."""
        if isinstance(self.engine, TorchEngine):
            return self.engine.autocast_dtype
        return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(self.engine.dtype)

    @autocast_dtype.setter
    def autocast_dtype(self, dtype: torch.dtype | None) -> None:
        if not isinstance(self.engine, TorchEngine):
            raise ValueError("vLLM's dtype is set when its engine starts: build the scorer with that autocast_dtype.")
        self.engine.autocast_dtype = dtype

    @property
    def precision(self) -> str:
        """'bf16' (autocast) or 'fp32': what reports and the server's /health say was used."""
        names = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        return names.get(self.autocast_dtype, str(self.autocast_dtype))

    # ------------------------------------------------------------------------------------ formatting

    def _check_inputs(self, prompts, completions) -> None:
        """check_row_lists, and a chat template for conversations."""
        if check_row_lists(prompts, completions) == "messages" and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                "The rows are conversations (message lists) but the reward model's tokenizer has no chat template. "
                "Give the rows as strings or set a chat template."
            )

    def split(self, prompts, completions) -> SplitCompletions:
        """Training-format ids of each row, cut into prompt | thinking | answer by the `</think>` token id.

        The prompt is the longest common prefix of the full ids and the prompt's own ids (for conversations:
        with the generation prompt), so a token merged across the boundary counts as completion.
        """
        self._check_inputs(prompts, completions)
        with lock_of(self.tokenizer):
            return self._split(prompts, completions)

    def _split(self, prompts, completions) -> SplitCompletions:
        prompt_cache: dict[str, list[int]] = {}  # GRPO repeats each prompt num_generations times
        sequences, prompt_lengths, dropped = [], [], []
        for row, (prompt, completion) in enumerate(zip(prompts, completions)):
            try:
                ids = tokenize_response(self.tokenizer, prompt, completion)
                key = json.dumps(prompt, sort_keys=True, default=str)  # None and the text "null" differ
                if key not in prompt_cache:
                    prompt_cache[key] = prompt_ids(self.tokenizer, prompt)
                dropped.append(not isinstance(completion, str) and self._template_drops_text(prompt, completion))
            except Exception as err:  # a chat template's own error (jinja): name the row
                raise ValueError(
                    f"Row {row}: the chat template failed on this row ({type(err).__name__}: {err})."
                ) from None
            sequences.append(ids)
            prompt_lengths.append(min(common_prefix_length(prompt_cache[key], ids), len(ids) - 1))
        split = split_rows(sequences, prompt_lengths, self.think)
        split.dropped_text = torch.tensor(dropped, dtype=torch.bool)
        if split.dropped_text.any():
            rows = split.dropped_text.nonzero().flatten().tolist()
            message = (
                f"Rows {rows[:10]}: the chat template leaves text of the completion out of what is scored (e.g. text "
                "between two </think>); a policy could hide text from the reward model this way."
            )
            if self.dropped_text == "error":
                raise ValueError(message + " Fix the completions, or score with dropped_text='flag'.")
            logger.warning(message + " Flagged in ScoreDetails.dropped_text.")
        return split

    def _template_drops_text(self, prompt, completion: list[dict]) -> bool:
        """Whether the rendered conversation lacks non-whitespace text of the completion's messages."""
        rendered = "".join(chat_text(self.tokenizer, list(prompt or []) + list(completion)).split())
        return any(
            isinstance(m.get("content"), str) and "".join(m["content"].split()) not in rendered for m in completion
        )

    # -------------------------------------------------------------------------------------- scoring

    def score_ids(self, sequences: list[list[int]], prompt_lengths: list[int] | None = None) -> torch.Tensor:
        """(N,) fp32 rewards of already formatted id lists, in input order (no truncation here).

        prompt_lengths: each row's prompt length; with packing, rows whose prompts are identical share one
        prompt computation. The engine (`rmtorch.engines`) computes them.
        """
        return self.engine.score(sequences, prompt_lengths)

    def score_tokens(
        self, sequences: list[list[int]], prompt_lengths: list[int] | None = None, *, part: str = "full"
    ) -> ScoreDetails:
        """Rewards of rows given as token ids (prompt ids + completion ids, already in the training format): the
        entry for callers that tokenize themselves, like the server. `prompt_lengths` (each row's prompt tokens)
        lets rows that share a prompt compute it once. The completion is split at `</think>` only when a part is
        asked for; with part="full" the rows are scored as given and `unclosed_think` is None. Rows longer than
        max_length keep their last tokens (`formatting.keep_last`) and are flagged `truncated`."""
        if part != "full":
            return self.score_split(split_rows(sequences, prompt_lengths or [0] * len(sequences), self.think), part)
        lengths = list(prompt_lengths) if prompt_lengths is not None else [0] * len(sequences)
        sequences = list(sequences)
        truncated = torch.tensor(
            [self.max_length is not None and len(ids) > self.max_length for ids in sequences], dtype=torch.bool
        )
        if truncated.any():
            logger.warning(
                "%d of %d rows are longer than max_length=%d tokens; scoring their last %d tokens.",
                int(truncated.sum()), len(sequences), self.max_length, self.max_length,
            )  # fmt: skip
            for row in truncated.nonzero().flatten().tolist():
                sequences[row] = keep_last(sequences[row], self.max_length, self.bos_id)
                lengths[row] = 0  # its prompt was cut: nothing to share
        rewards, attributes = self.score_ids(sequences, lengths), None
        if self.reward_weights is not None:  # a rating model: the reward is the weighted sum of its attributes
            attributes = rewards.view(len(sequences), -1)  # (N, K), K = 1 included
            rewards = weighted_reward(attributes, self.reward_weights)
        nonfinite = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
        if nonfinite:  # TRL's GRPO treats NaN as a missing reward; say so rather than let it pass unseen
            logger.warning("Rows %s got a non-finite reward from the model (NaN or inf).", nonfinite[:10])
        num_tokens = torch.tensor([len(ids) for ids in sequences], dtype=torch.long)
        no_drops = torch.zeros(len(sequences), dtype=torch.bool)
        return ScoreDetails(rewards, num_tokens, truncated, None, no_drops, attributes)

    def score_split(self, split: SplitCompletions, part: str = "full") -> ScoreDetails:
        """Score `part` of already split rows (see `split`) with `score_tokens`."""
        if part != "full" and self.think.end_id is None:
            raise ValueError(
                f"part={part!r} splits completions at the reasoning end token, but this tokenizer has no "
                f"{self.think_end_token!r} token. Score part='full', or pass think_end_token= (the token or its id) "
                "for this model's reasoning end."
            )
        details = self.score_tokens(split.sequences(part), [len(ids) for ids in split.prompt_ids])
        details.unclosed_think = split.unclosed_think
        if split.dropped_text is not None:
            details.dropped_text = split.dropped_text
        return details

    def __call__(self, prompts, completions, *, part: str = "full", return_details: bool = False):
        """Rewards of N (prompt, completion) rows, (N,) fp32 in input order.

        prompts/completions: lists of strings, or of message lists (as TRL's GRPO passes conversations).
        part: "full" (prompt + completion), "answer" (prompt + the tokens after the last `</think>`),
        "thinking" (prompt + the tokens up to and including it); see `rmtorch.thinking`.
        return_details: return `ScoreDetails` (rewards, num_tokens, truncated, unclosed_think, dropped_text, and a
        rating model's attributes).
        """
        details = self.score_split(self.split(prompts, completions), part)
        return details if return_details else details.rewards

    def score_steps(self, prompts, completions, *, separator: str = "\n", aggregation: str = "min"):
        """A process reward model's rewards: `rmtorch.steps.StepScores` with each row's step rewards (the head at
        each step's separator, found by its token ids, all in one forward) and a row reward by `aggregation` (min,
        last, mean, or product of the steps' sigmoid probabilities). completions: each a list of step strings, or one
        string whose steps `separator` ends (text rows, formatted as train.py --objective steps formats them)."""
        from rmtorch.steps import score_steps

        return score_steps(self, prompts, completions, separator, aggregation)

    def as_reward_func(self, name: str = "reward_model", *, part: str = "full", transform=None):
        """A TRL `reward_funcs` entry: `f(prompts, completions, **kwargs) -> list[float]` named `name`.

        transform: optional callable on the (N,) reward tensor (e.g. a RewardNormalizer) applied before the floats
        are returned; TRL's own kwargs (completion_ids, trainer_state, ...) are ignored.
        """

        def reward_func(prompts, completions, **kwargs) -> list[float]:
            rewards = self(prompts, completions, part=part)
            if transform is not None:
                rewards = transform(rewards)
            return rewards.tolist()

        reward_func.__name__ = reward_func.__qualname__ = name
        return reward_func


def rating_weights(config) -> list[float] | None:
    """A rating model's reward weights (config.rmtorch_reward_weights, one per output), None for a one-output model."""
    weights = getattr(config, "rmtorch_reward_weights", None)
    if weights is None and getattr(config, "num_labels", 1) != 1:
        raise ValueError(
            f"The model has {config.num_labels} outputs but no rmtorch_reward_weights in its config, so its outputs "
            "cannot be combined into one reward. Add rmtorch_reward_weights (one weight per label) to config.json."
        )
    if weights is not None and len(weights) != config.num_labels:
        raise ValueError(
            f"config.rmtorch_reward_weights has {len(weights)} weights for {config.num_labels} outputs; give one per "
            "output."
        )
    return weights


def check_row_lists(prompts, completions) -> str | None:
    """The rows' kind, "text" or "messages" (None for no rows); ValueError naming the first row that is neither
    (text, text) nor (messages, messages), that differs in kind from row 0, or whose messages training would refuse
    (`rmtorch.pairs.check_messages`: roles, content, a final assistant turn, which may be empty here)."""
    if isinstance(prompts, (str, dict)) or isinstance(completions, (str, dict)):
        raise ValueError(
            "prompts and completions must be lists with one entry per row, not a single string or message."
        )
    if len(prompts) != len(completions):
        raise ValueError(
            f"Got {len(prompts)} prompts but {len(completions)} completions; pass one prompt per completion "
            "(repeat a prompt for each of its completions)."
        )
    kinds = []
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        if isinstance(completion, str) and isinstance(prompt, (str, type(None))):
            kinds.append("text")
        elif isinstance(completion, list) and isinstance(prompt, (list, type(None))):
            if prompt:  # None and [] both mean no prompt
                check_messages(prompt, f"Row {row}", "prompt", must_end_with_assistant=False)
            check_messages(
                completion, f"Row {row}", "completion", must_end_with_assistant=True, allow_empty_response=True
            )
            kinds.append("messages")
        else:
            raise ValueError(
                f"Row {row}: prompt is {type(prompt).__name__} and completion is {type(completion).__name__}. "
                "Give both as strings, or both as lists of {'role', 'content'} messages (the completion, e.g. "
                "[{'role': 'assistant', 'content': ...}])."
            )
        if kinds[-1] != kinds[0]:
            raise ValueError(
                f"Row {row} is {kinds[-1]} but row 0 is {kinds[0]}; score standard text and conversations in "
                "separate calls."
            )
    return kinds[0] if kinds else None
