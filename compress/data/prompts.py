"""Built-in prompts the teacher answers to make the distillation set when no data= is given.

Varied on purpose (explanations, lists, how-tos, rewriting, short reasoning, code, advice) so the
student sees the teacher's behaviour across the kinds of requests a small assistant gets.
"""
import random

TOPICS = [
    "photosynthesis", "the water cycle", "black holes", "vaccines", "the French Revolution",
    "compound interest", "machine learning", "the immune system", "volcanoes", "climate change",
    "the printing press", "electric cars", "honeybees", "the stock market", "sleep",
    "the Roman Empire", "recycling", "earthquakes", "the internet", "coffee",
    "the Moon landing", "gravity", "bread baking", "solar panels", "friendship",
    "the human heart", "time management", "the Great Wall of China", "rainbows", "chess",
    "public speaking", "ocean tides", "dinosaurs", "music theory", "budgeting",
]

TEMPLATES = [
    "Explain {t} to a ten-year-old.",
    "Give three interesting facts about {t}.",
    "Write a short paragraph about {t}.",
    "What are the main advantages and disadvantages of {t}?",
    "Summarize what {t} is in two sentences.",
    "Write a haiku about {t}.",
    "List five questions a student might ask about {t}, with short answers.",
    "What is a common misconception about {t}?",
]

EXTRA = [
    "What is 17 times 23? Show your steps.",
    "If a train travels 60 km in 45 minutes, what is its average speed in km/h?",
    "Write a Python function that returns the largest number in a list.",
    "Write a Python function that checks whether a string is a palindrome.",
    "How do I make a cup of tea?",
    "Rewrite this sentence to be more formal: 'gonna grab food, back soon'.",
    "Translate 'Good morning, how are you?' into French.",
    "Give me a packing list for a weekend camping trip.",
    "Write a polite email declining a meeting invitation.",
    "What should I consider when adopting a dog?",
    "How can I improve my focus while studying?",
    "Write a short story about a robot who learns to paint, in under 100 words.",
    "Sort these numbers from smallest to largest: 42, 7, 19, 3, 88.",
    "What is the difference between weather and climate?",
    "Suggest three names for a bakery.",
    "Explain what a prime number is and list the first five.",
]


def builtin_prompts(n: int, seed: int = 0) -> list[str]:
    """n distinct prompts, shuffled deterministically by seed."""
    pool = [tpl.format(t=t) for t in TOPICS for tpl in TEMPLATES] + EXTRA
    random.Random(seed).shuffle(pool)
    return pool[:min(n, len(pool))]
