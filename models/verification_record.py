"""What `pocketlm verify` found about a converted model, as the store keeps it beside the model."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VerificationRecord:
    model: str  # the store name of the model verified
    reference: str  # the model it was compared with (its lineage parent, or --against), by name as it was then
    level: str  # "faithful" | "lossy" | "broken"
    summary: str  # "tokens identical, top-1 98.7%, KLD 0.012, PPL +3.1%"
    advice: str  # "" for faithful; what to do otherwise, one sentence
    scored_tokens: int
    tokens_identical: bool
    top1_agreement: float  # 0..1
    mean_kld: float  # nats
    perplexity_change: float  # model/reference - 1 (0.031 = +3.1%)
    text: str  # "built-in" or the text file's name
    verified_at: float  # time.time()

    @property
    def broken(self) -> bool:
        return self.level == "broken"
