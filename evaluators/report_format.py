"""What an evaluation report (eval.json) is, for its readers: light, so that reading one loads no model code."""

FORMAT = "erasure-eval/2"  # 2: a concept's attacks are a list, "attacks" (1: at most one, "attack")
READABLE_FORMATS = ("erasure-eval/1", FORMAT)


def concept_attacks(section: dict) -> list[dict]:
    """A concept's attack results, in the order they ran, from a report of either format."""
    if "attacks" in section:
        return list(section["attacks"])
    return [section["attack"]] if section.get("attack") else []
