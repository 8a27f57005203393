"""Experiment: the model's own calibration text written from a broader list of instructions.

selfgen.py's 48 instructions ask for explanations, stories, advice and one haiku; none asks a short
factual question, and one asks for verse. This script is `bench/quality.py` with 48 more
instructions appended (short factual questions, verse, lists of tips, explanations, code; none of
them is one of the app's example prompts or of quality.py's MORE_PROMPTS). Every text the model
writes itself changes with the list, so learning and recovery both read the new text. Same
arguments as quality.py:

    python bench/broad_prompts.py --preset bundled-quality --set "seed=0 eval_windows=40" --baselines "" \
        --heldout bench/texts/*.txt --recover both:300 --answers 48 --more-prompts
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxsparse_core.data import selfgen  # noqa: E402

EXTRA = [
    "Who invented the telephone?", "What is the chemical symbol for gold?", "How many continents are there?",
    "What is the tallest mountain on Earth?", "Who painted the Mona Lisa?", "What language is spoken in Brazil?",
    "How many days are there in a leap year?", "Which gas do plants take in from the air?",
    "Who was the first person to walk on the Moon?", "What is the largest ocean?", "What is the square root of 144?",
    "In which year did the Second World War end?", "What is the main ingredient of bread?",
    "How many sides does a hexagon have?", "What is the longest river in Africa?", "Which organ pumps blood through the body?",
    "Write a short poem about autumn.", "Write a limerick about a clumsy cat.", "Write four lines of verse about the night sky.",
    "Write a poem about a mountain village.", "Write a rhyming couplet about rain.", "Write a short poem about friendship.",
    "Write a haiku about the morning.", "Write a poem for a child's birthday.",
    "Give three tips for saving money.", "List four ways to reduce stress.", "Give five tips for a tidy kitchen.",
    "What are three benefits of reading every day?", "List three tips for better public speaking.",
    "Give three tips for growing tomatoes.", "What are four good habits for writing clear emails?",
    "Give three tips for learning to touch-type.",
    "Explain in two sentences what a black hole is.", "Explain in one sentence what DNA is.",
    "Explain what an operating system does.", "Explain in two sentences how a compass works.",
    "What is the difference between a lake and a sea?", "Explain briefly what electricity is.",
    "Explain what a spreadsheet is used for.", "Explain in two sentences what democracy is.",
    "Write a Python function that checks whether a number is prime.", "How do I read a file line by line in Python?",
    "Explain what a for loop does, with an example.", "Write a short JavaScript function that adds two numbers.",
    "What is the difference between a list and a tuple in Python?", "Write a SQL query that counts the rows of a table.",
    "How do I comment code in Python?", "Give two tips for naming variables well.",
]
assert len(EXTRA) == 48 and not set(EXTRA) & set(selfgen.PROMPTS)
selfgen.PROMPTS[:] = selfgen.PROMPTS + EXTRA

if __name__ == "__main__":
    import quality
    quality.main()
