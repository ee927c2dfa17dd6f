"""Does a converted model still compute what its reference does? Tokenization, next-token agreement, KL divergence
and perplexity of the two on the same ids, each through its own backend, and a verdict on the figures."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pocketlm.backends.base import ChatMessage, ChatModel
from pocketlm.backends.perplexity import exp_or_infinity
from pocketlm.models.errors import Cancelled, PocketError

if TYPE_CHECKING:
    import numpy as np

# A conversation whose rendering both models must tokenize id for id: a system turn, a finished exchange and a
# question, so the template's every role marker and the generation prompt are covered.
COMPARISON_CONVERSATION = (
    ChatMessage("system", "You are a helpful assistant."),
    ChatMessage("user", "What is the capital of France?"),
    ChatMessage("assistant", "The capital of France is Paris."),
    ChatMessage("user", "And the largest ocean?"),
)
# Text that tells pre-tokenizers apart: numbers of every length, contractions in both cases, runs of spaces, tabs and
# new lines, code, punctuation runs, several scripts and joined emoji. A prose text alone does not: measured on
# SmolLM2, a GGUF given the llama-bpe or qwen2 pre-tokenizer tokenized the built-in text and the conversation the same
# as the checkpoint, and this text differently (as it does with default and deepseek-llm); with gpt-2 or starcoder it
# stays identical, as it should: for that vocabulary they split the same.
TOKENIZER_PROBE = (
    "Numbers 7 42 365 2024 31415926 3.14 1,000,000 -0.5e-3 0x1F; dates 2026-11-29 12:30. "
    "Contractions: I'm, you're, it's, we've, they'll, I'd, DON'T, We'Re, he'S. "
    "Quotes 'single' \"double\" «guillemets» `code` ```fenced``` ... !!! ??? --- === ___ "
    "Spaces:  two   three    four\ttab\t\ttabs\n\nnew lines\n \n  \n"
    "def f(x):\n    return {'a': [1, 2], \"b\": (x**2 // 3)}  # comment\n"
    "Accents: café naïve Ångström façade. Ελληνικά Русский язык 日本語のテキスト 中文字符 한국어 العربية हिन्दी "
    "Emoji: 🚀 🦙🦙 👩‍💻 ✅ 😶‍🌫️ Symbols: © ® ™ € £ ¥ ° ± × ÷ → ⇒ ∞ √ ≈ ≠ ≤ ≥ "
    "CamelCaseWords snake_case_words kebab-case-words URL https://example.com/a?b=c&d=e#f email a.b@c.org"
)
_ROWS_PER_BLOCK = 64  # logits rows turned into float64 at a time: 64 × a 150k vocabulary is 77 MB a model


# Scored positions: the built-in text is 433 tokens of SmolLM2's tokenizer, so all of it; a longer text is cut here,
# which keeps a comparison to one forward pass of at most this many tokens through each model (and their logits, 512 ×
# the vocabulary × 4 bytes each, in memory at once: 100 MB at a 49k vocabulary).
COMPARISON_TOKENS = 512


@dataclass(frozen=True)
class Tokenizations:
    """How one model tokenizes what both must tokenize id for id."""

    text: tuple[int, ...]
    probe: tuple[int, ...]  # TOKENIZER_PROBE
    chat_prompt: tuple[int, ...]  # COMPARISON_CONVERSATION, rendered by the model's chat template


@dataclass(frozen=True)
class Scoring:
    """One model's part of a comparison: its tokenizations and its logits after each of `ids` (the reference's ids of
    the text): kept, so the reference can be closed before the model is loaded."""

    tokenizations: Tokenizations
    ids: tuple[int, ...]
    logits: np.ndarray  # len(ids) × vocabulary


@dataclass(frozen=True)
class Comparison:
    scored_tokens: int
    tokens_identical: bool  # the text, TOKENIZER_PROBE and a fixed conversation (chat_prompt_tokens) tokenize the same, id for id
    first_difference: str  # "" or one sentence: where the ids first differ
    top1_agreement: float  # fraction of positions whose argmax agrees
    mean_kld: float  # mean KL(reference ‖ model), nats, over positions
    max_kld: float
    reference_perplexity: float  # over the same ids, from the same logits
    model_perplexity: float
    differs_in: str = ""  # "" or what first tokenized differently: "the text", "the tokenizer probe" or "the chat prompt"

    @property
    def perplexity_change(self) -> float:
        """model/reference - 1: 0.031 is +3.1%; infinite when either perplexity is (inf/inf would be NaN)."""
        change = self.model_perplexity / self.reference_perplexity - 1
        return change if change == change else math.inf


Level = Literal["faithful", "lossy", "broken"]


@dataclass(frozen=True)
class Verdict:
    level: Level
    summary: str  # "tokens identical, top-1 98.7%, KLD 0.012, PPL +3.1%"
    advice: str  # "" unless broken: where the models part and what to do


def score(
    model: ChatModel,
    text: str,
    ids: Sequence[int] | None = None,
    max_tokens: int = COMPARISON_TOKENS,
    cancel: threading.Event | None = None,
) -> Scoring:
    """`model`'s tokenizations, and its logits after each of `ids` (None: its own ids of `text`, as the reference's),
    at most `max_tokens` and what its context holds. Refuses a text of fewer than two tokens before any scoring."""
    _check(cancel)
    tokenizations = Tokenizations(tuple(model.tokenize(text)), tuple(model.tokenize(TOKENIZER_PROBE)),
                                  tuple(model.chat_prompt_tokens(list(COMPARISON_CONVERSATION))))  # fmt: skip
    scored = tuple(tokenizations.text if ids is None else ids)[: min(max_tokens, model.description.context_length)]
    if len(scored) < 2:
        raise PocketError(f"The comparison text is {len(scored)} token long: comparing needs at least two.", "Give a longer text.")
    _check(cancel)
    return Scoring(tokenizations, scored, model.token_logits(list(scored)))


def compare(reference: Scoring, model: Scoring) -> Comparison:
    """The figures from the two scorings (the model's of the reference's ids), over the ids both scored."""
    pairs = (("the text", reference.tokenizations.text, model.tokenizations.text),
             ("the tokenizer probe", reference.tokenizations.probe, model.tokenizations.probe),
             ("the chat prompt", reference.tokenizations.chat_prompt, model.tokenizations.chat_prompt))  # fmt: skip
    differs_in, difference = next(((what, sentence) for what, ours, theirs in pairs if (sentence := first_difference(what, ours, theirs))), ("", ""))
    count = min(len(reference.ids), len(model.ids))
    return compare_logits(reference.logits[:count], model.logits[:count], reference.ids[:count], difference, differs_in)


def compare_models(
    reference: ChatModel,
    model: ChatModel,
    text: str,
    max_tokens: int = COMPARISON_TOKENS,
    cancel: threading.Event | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> Comparison:
    """score the reference, score the model on the reference's ids, compare: for two models already loaded (verify
    loads one at a time and calls score and compare itself). on_step(done, 3) after each; cancelling raises Cancelled.

    Both score the same ids, so the KLD measures the weights even where the tokenizers differ (that is reported
    apart)."""
    scorings: list[Scoring] = []
    for done, scorer in enumerate((reference, model), start=1):
        scorings.append(score(scorer, text, scorings[0].ids if scorings else None, max_tokens, cancel))
        if on_step is not None:
            on_step(done, 3)
    _check(cancel)
    comparison = compare(scorings[0], scorings[1])
    if on_step is not None:
        on_step(3, 3)
    return comparison


def first_difference(what: str, reference_ids: Sequence[int], model_ids: Sequence[int]) -> str:
    """"" when the two id lists are equal, else one sentence saying where they first differ."""
    for position, (expected, got) in enumerate(zip(reference_ids, model_ids)):
        if expected != got:
            return f"Token {position} of {what} is {expected} for the reference but {got} for the model."
    if len(reference_ids) != len(model_ids):
        return (f"The reference tokenizes {what} into {len(reference_ids)} tokens and the model into {len(model_ids)}, "
                f"the first {min(len(reference_ids), len(model_ids))} identical.")  # fmt: skip
    return ""


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("The comparison was cancelled.", "Run it again to compare.")


def compare_logits(reference: np.ndarray, model: np.ndarray, ids: Sequence[int], difference: str = "", differs_in: str = "") -> Comparison:
    """The figures from two models' logits after each of `ids` (token_logits), over positions 0..n-2 (each predicts
    the next id); `difference` is first_difference's sentence and `differs_in` what it is about, "" when tokens match.

    KLD and top-1 compare the distributions over the common vocabulary (the narrower of the two), each renormalised,
    a block of rows at a time: a vocabulary padded with never-used rows must not count. The perplexities are each
    model's own, over its full vocabulary, as `pocketlm bench --ppl` computes them."""
    import numpy as np

    from pocketlm.backends.scoring import log_softmax

    width = min(reference.shape[1], model.shape[1])
    targets = np.asarray(ids[1:], dtype=np.int64)
    klds = np.empty(len(targets))
    agreeing = 0
    for start in range(0, len(targets), _ROWS_PER_BLOCK):
        stop = min(start + _ROWS_PER_BLOCK, len(targets))
        p = log_softmax(reference[start:stop, :width])
        q = log_softmax(model[start:stop, :width])
        klds[start:stop] = (np.exp(p) * (p - q)).sum(axis=1)
        agreeing += int((p.argmax(axis=1) == q.argmax(axis=1)).sum())
    # Rounding can push a KL divergence of identical rows a hair below 0; it is 0. A row the model made NaN (an
    # overflow in its weights) is infinitely far from the reference's distribution.
    klds = np.maximum(klds, 0.0, where=~np.isnan(klds), out=klds)
    klds[np.isnan(klds)] = np.inf
    return Comparison(
        scored_tokens=len(targets),
        tokens_identical=not difference,
        first_difference=difference,
        top1_agreement=agreeing / len(targets),
        mean_kld=float(klds.mean()),
        max_kld=float(klds.max()),
        reference_perplexity=_perplexity(reference[: len(targets)], targets),
        model_perplexity=_perplexity(model[: len(targets)], targets),
        differs_in=differs_in,
    )


def _perplexity(logits: np.ndarray, targets: np.ndarray) -> float:
    """exp(mean negative log-probability of the targets); infinite when a target is outside this model's vocabulary
    (it gives that token no probability at all)."""
    from pocketlm.backends.scoring import token_log_probabilities

    if len(targets) == 0 or int(targets.max()) >= logits.shape[1]:
        return math.inf
    return exp_or_infinity(-float(token_log_probabilities(logits, targets).mean()))


# The verdict's thresholds. Measured here with compare_models on the starter model (SmolLM2-135M-Instruct: the test
# suite's HF checkpoint, float32 weights dequantized from the starter's Q4_1, through PyTorch in float32 as reference;
# each GGUF converted from it through llama.cpp), on converters.calibration's HELD_OUT_TEXT (432 positions) /
# BUILTIN_CALIBRATION_TEXT (494):
#
#   model                        mean KLD           max KLD        top-1          PPL change
#   f16 (float conversion)       3.3e-6 / 3.7e-6    1.6e-5/5.8e-5  99.8% / 99.6%  +0.03% / -0.02%
#   bf16 (float conversion)      4.9e-5 (held-out)
#   Q8_0                         0.0039 / 0.0043    0.032 / 0.028  96.1% / 96.0%  +0.3% / +0.2%
#   Q4_K_M                       0.049 / 0.054      0.28 / 0.65    86.3% / 88.3%  +4.3% / +8.5%
#   Q2_K (pocketlm's smallest)   0.41 / 0.47        2.4 / 4.1      67.4% / 64.0%  +29% / +43%
#   f16, q_proj/o_proj swapped   10.3 / 10.5        21 / 23        0.0% / 0.0%    ×18,000 / ×30,000
#   f16, down_proj 3 ↔ 20        0.58 / 1.07        5.9 / 7.4      59.5% / 54.3%  +82% / +169%
#
# llama.cpp's published table (tools/perplexity/README.md, LLaMA 3 8B on Wikitext-2, KLD / same top p): BF16 vs FP16
# 0.000025 / 99.74%; Q8_0 0.0014 / 97.7% (LLaMA 2 7B: 0.00037 / 98.8%); Q4_K_M 0.031 / 91.9%; Q2_K 0.445 / 71.1%;
# the most extreme legitimate quantization, IQ1_S at 1.6 bits per weight, 2.2.
#
# Faithful: KLD at most 2e-4: 4× our bf16 conversion (the float type that rounds most), 8× the published BF16→FP16
# and 60× our f16, yet 20× under our Q8_0 and 1.8× under the best published Q8_0. KLD alone decides it: at float
# level, the few top-1 disagreements left (1 or 2 of 432 here) are near-ties that rounding tips, and on a short text
# one of them would cost whole percents.
FAITHFUL_MAX_KLD = 2e-4
# A float result (F32/F16/BF16 weights) compared with a float reference only rounds differently: above 1e-3 it
# computes something else. That is 20× our bf16 conversion and 40× the published BF16→FP16, yet 4× under our Q8_0,
# 580× under the down_proj swap above (which a quantization's band could not tell from Q2_K's loss).
FLOAT_MAX_KLD = 1e-3
# Broken whatever the types: KLD above 2, over 4× what Q2_K (the smallest pocketlm makes) costs this 135M model
# (small models lose the most) and the published LLaMA 3 Q2_K, yet 5× under swapped attention tensors; or top-1
# under 20% (3× under our Q2_K's worst) with a KLD over 1, twice Q2_K's. Top-1 alone would not do: where the reference
# hesitates between many tokens (a random test model; mixed 3/6-bit of one measured top-1 18% at KLD 0.47), rounding
# alone flips most argmaxes. Between these and faithful a quantized result is "lossy": what quantizing costs.
BROKEN_MIN_KLD = 2.0
BROKEN_MAX_TOP1 = 0.2
BROKEN_MAX_TOP1_MIN_KLD = 1.0


def judge(comparison: Comparison, quantized: bool) -> Verdict:
    """faithful (a float conversion's level), lossy (within what quantizing costs: only a `quantized` result, or one
    compared with a quantized reference, may be) or broken, with the figures and, when broken, what to do."""
    summary = describe(comparison)
    figures_finite = all(math.isfinite(value) for value in (comparison.mean_kld, comparison.model_perplexity))
    if not comparison.tokens_identical:
        advice = _OTHER_CHAT_TEMPLATE if comparison.differs_in == "the chat prompt" else _OTHER_TOKENS
        return Verdict("broken", summary, f"{comparison.first_difference} {advice}".strip())
    predicts_otherwise = comparison.top1_agreement < BROKEN_MAX_TOP1 and comparison.mean_kld > BROKEN_MAX_TOP1_MIN_KLD
    if not figures_finite or comparison.mean_kld > BROKEN_MIN_KLD or predicts_otherwise:
        return Verdict("broken", summary, _OTHER_PREDICTIONS)
    if comparison.mean_kld <= FAITHFUL_MAX_KLD:
        return Verdict("faithful", summary, "")
    if not quantized and comparison.mean_kld > FLOAT_MAX_KLD:
        return Verdict("broken", summary, _FLOAT_DIFFERS)
    return Verdict("lossy", summary, "")


_OTHER_TOKENS = "It splits text differently from the reference: convert it again from the original checkpoint with its own tokenizer files."
_OTHER_CHAT_TEMPLATE = "Its chat template renders a conversation differently from the reference's: convert it again from the original checkpoint with its tokenizer_config.json (or chat_template.jinja)."
_OTHER_PREDICTIONS = "It no longer predicts what the reference does: convert it again from the original checkpoint, and report it if that does the same."
_FLOAT_DIFFERS = "Its float weights should only round differently from the reference's, yet it predicts differently: convert it again from the original checkpoint, and report it if that does the same."


def describe(comparison: Comparison) -> str:
    """"tokens identical, top-1 98.7%, KLD 0.012, PPL +3.1%"."""
    tokens = "tokens identical" if comparison.tokens_identical else "tokens differ"
    change = comparison.perplexity_change
    ppl = f"PPL {change:+.1%}" if math.isfinite(change) else "PPL infinite"
    return f"{tokens}, top-1 {comparison.top1_agreement:.1%}, KLD {_kld(comparison.mean_kld)}, {ppl}"


def _kld(value: float) -> str:
    # Three decimals read well from quantizations (0.031) up; a float conversion's 0.00002 needs its own digits.
    if not math.isfinite(value):
        return "infinite"
    return f"{value:.3f}" if value >= 0.001 or value == 0 else f"{value:.1e}"
