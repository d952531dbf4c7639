"""The label sets a job may ask for, and their words: what the API validates and the engine prompts with.

Pure data with no imports, so that the engine (which imports nothing else of the
project) and the protocol share one definition.
"""

#: Label sets the classifier can answer with: positive, negative, then neutral in three-class sets.
LABEL_SETS: dict[str, tuple[str, ...]] = {
    "zh": ("正面", "负面"),
    "en": ("positive", "negative"),
    "zh3": ("正面", "负面", "中性"),
    "en3": ("positive", "negative", "neutral"),
}
