"""The trained reward model as a Python reward function, e.g. for TRL's `GRPOTrainer(reward_funcs=[...])`.

    from rm.reward_function import RewardFunction
    reward = RewardFunction("outputs/qwen3-rm", device="cuda", normalize=True)
    trainer = GRPOTrainer(model=..., reward_funcs=[reward], ...)

TRL calls a reward function with keyword arguments `prompts`, `completions` (and more, ignored here) and expects one
float per completion. Both of TRL's formats are rendered as training rendered pairs, so the rewards equal
`rm.score`'s for the same prompt and reply:
  conversational  prompts are message lists, completions lists of messages ([{"role": "assistant", ...}]): the
                  chat template renders prompt + reply and its end-of-turn follows (messages before the last
                  completion message, e.g. tool turns, count as prompt);
  standard        prompts and completions are strings: the prompt is taken as already rendered (the text the policy
                  was given) and the reply is followed by the template's end-of-turn, which a policy's decoded
                  completion lacks.
Truncation and the reward position (template_end or eos) are the training run's. No TRL import is needed.
"""

from __future__ import annotations

from typing import Any

from rm.scoring import Scorer


class RewardFunction:
    """Scores (prompt, completion) batches with a model trained by train.py; load once, call per batch."""

    def __init__(self, model: str, adapter: bool = False, base_model: str | None = None, device: str = "auto",
                 dtype: str = "auto", normalize: bool = False, batch_size: int = 16) -> None:
        """`model`: a training output directory, a merged model folder or an adapter folder (as rm.score takes).
        normalize: (reward - mean) / std with the eval statistics stored in config.json."""
        self.scorer = Scorer.load(model, adapter, base_model, device, dtype, normalize)
        self.batch_size = batch_size
        self.__name__ = "reward_model"  # TRL logs each reward function under its __name__

    def token_ids(self, prompt: list[dict[str, Any]] | str, completion: list[dict[str, Any]] | str) -> list[int]:
        """The token ids training would have read for this prompt and reply."""
        if isinstance(completion, str):
            return self.scorer.encoder.encode_response(prompt, completion)
        if isinstance(prompt, str):
            raise TypeError("a conversational completion (list of messages) needs a conversational prompt")
        *turns, reply = completion
        return self.scorer.encoder.encode_response(list(prompt) + turns, reply["content"])

    def __call__(self, prompts: list[list[dict[str, Any]] | str], completions: list[list[dict[str, Any]] | str],
                 **kwargs: Any) -> list[float]:
        rows = [self.token_ids(p, c) for p, c in zip(prompts, completions, strict=True)]
        return self.scorer.rewards(rows, self.batch_size)
