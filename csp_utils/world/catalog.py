"""What the procedural world is made of: shape categories in frequency-rank order, colours,
sizes, relations, splits, natural-uncertainty variants, themes and the number words questions use."""

# Frequency-rank order: the first category is the most frequent (Zipf rank 1).
CATEGORIES = (
    "circle", "square", "triangle", "star", "cross", "heart", "diamond",
    "ring", "crescent", "arrow", "hexagon", "frame", "semicircle", "hourglass",
)
# Well separated, all bright enough to stand out on the dark backgrounds.
COLORS = {
    "red": (220, 45, 45),
    "orange": (245, 145, 30),
    "yellow": (240, 225, 50),
    "green": (50, 180, 70),
    "blue": (50, 100, 235),
    "purple": (160, 70, 210),
    "white": (235, 235, 235),
}
COLOR_NAMES = tuple(COLORS)
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below", "touching")
SPLITS = ("base", "csp", "eval")
VARIANTS = ("clean", "blur", "low_light", "small", "occlusion", "clutter")
DEGRADATIONS = VARIANTS[1:]
# degradations outside the suite: a check of what transfers to shifts no set and no choice has seen
HELD_OUT_DEGRADATIONS = ("haze", "pixelate", "jpeg")
# Themes interleave frequency ranks (i % 4), so each theme has frequent and rare members
# and "popular" (global frequency) differs from "adversarial" (co-occurrence).
THEMES = {f"theme{t}": tuple(CATEGORIES[t::4]) for t in range(4)}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
