"""A deterministic generator of plain English sentences from a real vocabulary (a small grammar)."""

from __future__ import annotations

import random

ADJECTIVES = """old young quiet busy small large happy tired clever brave gentle angry careful honest
famous lonely proud strange hungry bright dark cold warm heavy empty narrow green yellow silver wooden
ancient modern distant friendly nervous patient""".split()
PEOPLE = """farmer teacher doctor student driver painter singer sailor baker neighbour child nurse soldier
writer captain gardener lawyer pilot farmer's-wife engineer fisherman musician officer waiter stranger
visitor""".replace("farmer's-wife ", "").split()
THINGS = """basket letter garden window river bridge market kitchen horse table bottle castle forest
wagon village mountain ladder candle blanket lantern hammer picture teapot bicycle carpet mirror parcel
ribbon orchard harbour meadow cottage""".split()
PLACES = ["the market", "the station", "the harbour", "the old church", "the village square", "the river bank",
          "the school", "the library", "the hospital", "the bakery", "the north road", "the top of the hill",
          "the edge of the forest", "the city hall", "the farm", "the garden gate"]
VERBS_T = """carried painted found opened closed cleaned repaired sold bought moved watched lifted dropped
followed wrapped counted borrowed described noticed remembered pushed pulled washed hid""".split()
VERBS_I = """waited laughed smiled listened rested shouted whispered wandered hurried slept worked
complained""".split()
TIMES = ["this morning", "last night", "before the winter came", "after the long storm", "on a sunday afternoon",
         "every evening", "in the early spring", "during the summer", "at midnight", "two days ago",
         "before breakfast", "after dinner", "once a week", "late in the autumn"]
NUMBERS = "two three four five six seven eight nine ten twelve twenty".split()
PREPOSITIONS = ["under", "behind", "beside", "near", "across", "over", "inside"]
NAMES = """Anna Peter Maria John Clara Thomas Lucy Henry Emma Oliver Sarah Daniel Grace Martin Helen""".split()
MANNER = ["slowly", "quickly", "quietly", "carefully", "happily", "patiently", "gladly", "suddenly"]


def _plural(noun: str) -> str:
    if noun.endswith(("ch", "sh", "s", "x")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    if noun == "child":
        return "children"
    if noun == "fisherman":
        return "fishermen"
    return noun + "s"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class SentenceGenerator:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def _np(self, nouns: list[str], *, allow_plural: bool = True) -> str:
        r = self.rng
        noun = r.choice(nouns)
        adj = r.choice(ADJECTIVES) if r.random() < 0.6 else ""
        head = f"{adj} {noun}".strip()
        roll = r.random()
        if allow_plural and roll < 0.25:
            return f"{r.choice(NUMBERS)} {(adj + ' ') if adj else ''}{_plural(noun)}"
        if roll < 0.55:
            return f"the {head}"
        if roll < 0.8:
            return f"{_article(head)} {head}"
        return f"{r.choice(['my', 'his', 'her', 'our', 'their'])} {head}"

    def _subject(self) -> str:
        return self.rng.choice(NAMES) if self.rng.random() < 0.3 else self._np(PEOPLE, allow_plural=False)

    def sentence(self) -> str:
        r = self.rng
        form = r.random()
        if form < 0.55:
            words = [self._subject(), r.choice(VERBS_T), self._np(THINGS)]
            if r.random() < 0.5:
                words += [r.choice(PREPOSITIONS), self._np(THINGS, allow_plural=False)]
            elif r.random() < 0.5:
                words += ["to", r.choice(PLACES)]
        elif form < 0.8:
            words = [self._subject(), r.choice(VERBS_I)]
            if r.random() < 0.5:
                words.append(r.choice(MANNER))
            words += [r.choice(["at", "near", "behind"]), r.choice(PLACES)]
        else:
            words = [self._subject(), "gave", self._np(PEOPLE), self._np(THINGS)]
        if r.random() < 0.4:
            words.append(r.choice(TIMES))
        text = " ".join(words)
        return text[0].upper() + text[1:] + "."

    def unique(self, n: int, max_tries_factor: int = 50) -> list[str]:
        seen: dict[str, None] = {}
        for _ in range(n * max_tries_factor):
            seen.setdefault(self.sentence(), None)
            if len(seen) == n:
                return list(seen)
        raise RuntimeError(f"could not generate {n} distinct sentences")


def docs_sentences() -> list[str]:
    """The bundled plain-English sentences (docs_sentences.txt: CPython's standard-library docstrings),
    in the file's order."""
    from pathlib import Path

    lines = (Path(__file__).with_name("docs_sentences.txt")).read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line and not line.startswith("#")]

