"""Calibration text: what GGUF's importance matrix and GPTQ measure a model's activations on.

The built-in text is short (495 tokens with SmolLM2's tokenizer: one 512-token chunk), which is enough for an
importance matrix (a mean per column) and gives GPTQ a usable Hessian for small models; a longer text the user gives,
of the kind the model will see, calibrates better. Measured with GPTQ 4-bit g64 on the 135M model, perplexity on
held-out general prose (float 27.5, round-to-nearest 41.1): built-in 35.6; 2,400 tokens of general prose 32.9;
5,550 tokens of Python documentation 40.8 (GPTQ fits what it is shown: text unlike the use helps little).
"""

from __future__ import annotations

from pathlib import Path

from pocketlm.converters.base import ConversionError

BUILTIN = "builtin"

# A short general-purpose calibration text: prose, dialogue, code, numbers and lists, as imatrix datasets mix them.
BUILTIN_CALIBRATION_TEXT = """\
The old lighthouse stood at the edge of the cliff, its white paint peeling in long strips. Every evening the keeper
climbed the hundred and twelve steps to light the lamp, and every morning he wrote the weather in a leather book.
"Will the storm reach us tonight?" asked the girl from the village. "It always does," he said, "but it never stays."
In mathematics, a prime number is a natural number greater than 1 that has no divisors other than 1 and itself.
The first primes are 2, 3, 5, 7, 11, 13, 17, 19, 23 and 29; there are infinitely many of them, as Euclid showed.
def is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, int(n ** 0.5) + 1))
To make bread, mix 500 g of flour, 350 ml of warm water, 10 g of salt and 7 g of dried yeast. Knead for ten minutes,
let the dough rise for an hour, shape it, let it rise again, then bake at 230 °C for 35 minutes.
Photosynthesis converts light energy into chemical energy: plants take in carbon dioxide and water and, using
sunlight, produce glucose and oxygen. Most of the oxygen in the atmosphere comes from this process.
Q: What is the capital of France? A: Paris. Q: Which ocean is the largest? A: The Pacific Ocean.
- Check the oil level before a long drive.
- Keep the tyres at the pressure the manual gives.
- Replace the wiper blades once a year.
SELECT name, COUNT(*) AS orders FROM customers JOIN orders USING (customer_id) GROUP BY name ORDER BY orders DESC;
The committee met on 14 March 2024 and approved the budget of €2.5 million by a vote of nine to two.
Les enfants jouaient dans le parc pendant que leurs parents discutaient sur un banc. Der Zug kommt um acht Uhr an.
"""


def calibration_text(source: str) -> str:
    if source == BUILTIN:
        return BUILTIN_CALIBRATION_TEXT
    path = Path(source).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConversionError(f"Cannot read the calibration text {path} ({error}).", "Give a UTF-8 text file, or `builtin`.") from None
    if len(text.split()) < 50:
        raise ConversionError(f"The calibration text {path} is too short ({len(text.split())} words).", "Give at least a few paragraphs.")
    return text


def calibration_chunks(token_ids: list[int], chunk_tokens: int, max_chunks: int) -> list[list[int]]:
    """`token_ids` cut into consecutive chunks of `chunk_tokens` (the last may be shorter), at most `max_chunks`."""
    if chunk_tokens < 1 or max_chunks < 1:
        raise ValueError("chunk_tokens and max_chunks must be positive")
    chunks = [token_ids[i : i + chunk_tokens] for i in range(0, len(token_ids), chunk_tokens)]
    return chunks[:max_chunks]


# Held-out prose (433 tokens of SmolLM2's tokenizer), never calibrated on: quantizations are compared by their
# perplexity on it (the GPTQ tests, benchmarks/gptq_speed.py).
HELD_OUT_TEXT = """\
The history of bread goes back at least thirty thousand years. Early people ground wild grains between stones and \
baked the paste on hot rocks, making a flat and heavy bread. Later, farmers in the Fertile Crescent grew wheat and \
barley, and bread became a daily food. The Egyptians learned to use wild yeast, which made the dough rise and gave \
the bread a lighter texture. Bakers in ancient Rome worked in large public bakeries, and the city gave bread to its \
poorest citizens. In the Middle Ages, the color of bread showed a person's place in society: white bread was for the \
rich, while dark bread made from rye or barley was for the poor.
Rivers shape the land they cross. A young river runs fast and straight down a steep valley, cutting deep into the \
rock and carrying stones that grind the channel wider with every flood. Further down, where the slope is gentle, \
the water slows and drops its load of sand and silt, and the river begins to wander in wide loops across a flat \
plain. Over centuries a loop may be cut off during a flood, leaving a curved lake behind. Near the sea the river \
splits into many small channels, and the mud it carries builds a delta that grows a little further out every year.
When the first railways opened in the nineteenth century, many people feared that travelling at thirty miles an \
hour would harm the human body. Within a generation, trains had changed how cities grew, how food reached markets \
and even how clocks were set, because timetables needed every town along a line to keep the same time. Before that, \
each town had followed the sun, and noon in one city could be several minutes apart from noon in the next.
A good night's sleep helps the brain sort the day's memories. During deep sleep, the connections formed while \
learning are replayed and strengthened, while less useful ones fade. People who sleep after studying remember more \
the next day than those who stay awake for the same number of hours, and a short nap can help as well. Regular \
hours, a dark and quiet room and less caffeine in the afternoon are the simplest ways to sleep better.
"""
