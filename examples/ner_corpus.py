"""A small CoNLL-2003-style NER corpus, generated deterministically, and a CoNLL reader/writer.

Sentences come from newswire-like templates whose slots are filled with entities from built-in
gazetteers (PER, ORG, LOC, MISC), numbers, days and context words, so that the corpus has the
structure of CoNLL-2003: multi-token entities (``Bank of England``, ``Tour de France``), adjacent
entities, country names that are LOC in one sentence and part of an ORG in another, sports-result
lines and sentences without entities. Every gazetteer is split in two halves: the training part
of the corpus draws only from the first, while the dev and test parts draw from both, so about
half of the names in dev/test were never seen in training and a tagger has to use the context and
the shape of the words (what a per-word lookup cannot do).

Files are written in the CoNLL-2003 column format ``word POS chunk NER`` (IOB2 tags), one token
per line, sentences separated by a blank line, with a ``-DOCSTART-`` line first, and read back by
:func:`read_conll`, which also accepts the original IOB1 files and converts them to IOB2.
"""

from __future__ import annotations

import os
import random
from typing import Dict, List, Sequence, Tuple

Sentence = Tuple[List[str], List[str]]  # (tokens, IOB2 tags)

GAZETTEERS: Dict[str, List[str]] = {
    "PER": [
        "John Smith", "Helmut Kohl", "Boris Yeltsin", "Bill Clinton", "Nelson Mandela", "Jacques Chirac",
        "Tony Blair", "Pete Sampras", "Steffi Graf", "Michael Schumacher", "Damon Hill", "Yasser Arafat",
        "Benjamin Netanyahu", "Alan Greenspan", "Kofi Annan", "Martina Hingis", "Andre Agassi", "Carlos Moya",
        "Wasim Akram", "Sachin Tendulkar", "Romano Prodi", "Jose Maria Aznar", "Alexander Lebed", "Mike Tyson",
        "Dennis Bergkamp", "Alan Shearer", "Ruud Gullit", "Gianfranco Zola", "Kim Dae-jung", "Ian Botham",
        "Juergen Klinsmann", "Anna Kournikova", "Greg Norman", "Nick Faldo", "Lindsay Davenport", "Zhang Wei",
        "Maria Gonzalez", "Peter Hansen", "Thomas Muster", "Goran Ivanisevic",
    ],
    "ORG": [
        "Reuters", "European Commission", "Bank of England", "Bundesbank", "United Nations", "Manchester United",
        "Deutsche Bank", "General Motors", "Microsoft", "NATO", "Ajax Amsterdam", "Inter Milan", "Red Cross",
        "Federal Reserve", "World Bank", "Chelsea", "Ford Motor Co", "Boeing", "Lufthansa", "Barclays",
        "Bayern Munich", "Real Madrid", "Sony Corp", "Liverpool", "IBM", "Hamas", "Labour Party",
        "Supreme Court", "Moody 's", "Nikkei", "Arsenal", "Juventus", "OPEC", "Interfax", "PSV Eindhoven",
        "Fiat", "Standard and Poor 's", "Parliament", "Siemens", "Volkswagen",
    ],
    "LOC": [
        "Germany", "Britain", "France", "New York", "London", "Washington", "Russia", "China", "Japan",
        "Bosnia", "Israel", "Moscow", "Paris", "Bonn", "Italy", "Spain", "South Africa", "Hong Kong",
        "Sri Lanka", "Pakistan", "India", "Chechnya", "Jerusalem", "Tokyo", "Brussels", "Los Angeles",
        "Australia", "Iraq", "Belgium", "Netherlands", "Sarajevo", "Beijing", "Zaire", "Peru", "Turkey",
        "Sweden", "Lebanon", "Kenya", "Chicago", "Rio de Janeiro",
    ],
    "MISC": [
        "German", "British", "French", "Russian", "Chinese", "Japanese", "Israeli", "European", "American",
        "World Cup", "Olympic Games", "Euro 96", "Grand Prix", "Tour de France", "Nobel Prize", "U.S. Open",
        "Davis Cup", "Palestinian", "Serb", "Muslim", "Dutch", "Italian", "Spanish", "Australian", "Swiss",
        "Wimbledon", "Super Bowl", "Christmas", "Internet", "Champions League", "Iraqi", "Turkish", "Kurdish",
        "Belgian", "Swedish", "Premier League", "UEFA Cup", "Indian", "Pakistani", "Catholic",
    ],
}

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
CURRENCIES = ["dollars", "marks", "francs", "pounds", "yen", "lire"]

# Slots: {PER} {ORG} {LOC} {MISC} entities, {DAY}, {NUM} a number, {CUR} a currency word.
TEMPLATES = [
    "{PER} said on {DAY} that {ORG} would cut {NUM} jobs .",
    "{ORG} shares rose {NUM} percent in {LOC} on {DAY} .",
    "{PER} , who plays for {ORG} , scored twice in the {MISC} match against {LOC} .",
    "The {MISC} government announced new measures , {PER} told reporters in {LOC} .",
    "{LOC} beat {LOC} {NUM} - {NUM} in their {MISC} qualifier on {DAY} .",
    "Police in {LOC} arrested {NUM} people , a spokesman said .",
    "{PER} ( {LOC} ) {NUM} {NUM}",
    "{ORG} chairman {PER} resigned after talks with {ORG} .",
    "It was the first visit by a {MISC} leader to {LOC} in {NUM} years .",
    "Analysts at {ORG} expect the {LOC} economy to grow {NUM} percent this year .",
    "{PER} won the {MISC} title on {DAY} , beating {PER} in the final .",
    "Shares in {ORG} fell sharply after the results .",
    "The meeting in {LOC} ended without agreement , {ORG} said in a statement .",
    "{PER} met {PER} in {LOC} to discuss the {MISC} dispute .",
    "Fighting continued near {LOC} on {DAY} , the {ORG} said .",
    "{ORG} reported a net profit of {NUM} million {CUR} .",
    "{MISC} officials in {LOC} denied the report .",
    "{PER} of {ORG} told {ORG} that talks would resume on {DAY} .",
    "The {MISC} striker joined {ORG} from {ORG} for {NUM} million {CUR} .",
    "{LOC} and {LOC} signed a trade agreement in {LOC} .",
    "{PER} , the {MISC} foreign minister , arrived in {LOC} on {DAY} .",
    "Rain stopped play in {LOC} with {PER} on {NUM} not out .",
    "{ORG} said it expected demand in {LOC} to recover .",
    "The {MISC} team will face {ORG} in the {MISC} next week .",
    "Spokesman {PER} declined to comment .",
    "The company said it expected results to improve next year .",
    "Prices were little changed in thin trading on {DAY} .",
    "The talks will continue next week , officials said .",
    "Trading was quiet ahead of the holiday .",
    "He said the decision was final .",
]


def _shuffled_split(entity_type: str) -> Tuple[List[str], List[str]]:
    """The same split of a gazetteer into halves for every seed: (training names, held-out names)."""
    order = list(GAZETTEERS[entity_type])
    random.Random("split-" + entity_type).shuffle(order)
    cut = len(order) // 2
    return order[:cut], order[cut:]


def _fill(template: str, names: Dict[str, List[str]], rng: random.Random) -> Sentence:
    tokens: List[str] = []
    tags: List[str] = []
    for piece in template.split():
        if piece.startswith("{") and piece.endswith("}"):
            slot = piece[1:-1]
            if slot in names:
                entity = rng.choice(names[slot]).split()
                tokens.extend(entity)
                tags.extend(["B-" + slot] + ["I-" + slot] * (len(entity) - 1))
                continue
            if slot == "DAY":
                piece = rng.choice(DAYS)
            elif slot == "CUR":
                piece = rng.choice(CURRENCIES)
            else:  # NUM
                piece = str(rng.choice([rng.randint(1, 12), rng.randint(13, 99), rng.randint(100, 5000)]))
        tokens.append(piece)
        tags.append("O")
    return tokens, tags


def generate(num_sentences: int, seed: int, unseen_names: bool) -> List[Sentence]:
    """``num_sentences`` sentences from the templates, reproducible from ``seed``. With
    ``unseen_names=False`` (training data) entities come from the training half of each gazetteer
    only; with ``True`` (dev/test) from all of it."""
    names = {}
    for entity_type in GAZETTEERS:
        train_part, held_out = _shuffled_split(entity_type)
        names[entity_type] = train_part + (held_out if unseen_names else [])
    rng = random.Random(seed)
    return [_fill(rng.choice(TEMPLATES), names, rng) for _ in range(num_sentences)]


def _pos_and_chunk(token: str, tag: str) -> Tuple[str, str]:
    """Rough POS and chunk columns, so the files look like CoNLL-2003 (the taggers ignore them)."""
    if tag != "O":
        return "NNP", ("B-NP" if tag.startswith("B-") else "I-NP")
    if token.isdigit():
        return "CD", "B-NP"
    if not token[0].isalnum():
        return token if token in ".,()" else ":", "O"
    return ("NNP" if token[0].isupper() else "NN"), "B-NP"


def write_conll(path: str, sentences: Sequence[Sentence]) -> None:
    with open(path, "w") as out:
        out.write("-DOCSTART- -X- -X- O\n\n")
        for tokens, tags in sentences:
            for token, tag in zip(tokens, tags):
                pos, chunk = _pos_and_chunk(token, tag)
                out.write(f"{token} {pos} {chunk} {tag}\n")
            out.write("\n")


def iob1_to_iob2(tags: Sequence[str]) -> List[str]:
    """IOB1 (CoNLL-2003's original files: I- opens an entity, B- only splits two adjacent entities of
    one type) to IOB2 (every entity opens with B-). IOB2 input comes back unchanged."""
    converted = []
    for i, tag in enumerate(tags):
        previous = converted[i - 1] if i > 0 else "O"
        if tag.startswith("I-") and (previous == "O" or previous[2:] != tag[2:]):
            tag = "B-" + tag[2:]
        converted.append(tag)
    return converted


def read_conll(path: str) -> List[Sentence]:
    """Sentences of a CoNLL file: first column the word, last column the NER tag (IOB1 or IOB2,
    returned as IOB2); blank lines end sentences; ``-DOCSTART-`` lines are skipped."""
    sentences: List[Sentence] = []
    tokens: List[str] = []
    tags: List[str] = []
    with open(path) as src:
        for line in list(src) + [""]:
            fields = line.split()
            if fields and fields[0] == "-DOCSTART-":
                continue
            if not fields:
                if tokens:
                    sentences.append((tokens, iob1_to_iob2(tags)))
                    tokens, tags = [], []
                continue
            tokens.append(fields[0])
            tags.append(fields[-1])
    return sentences


SPLIT_FILES = {"train": ("train.txt", "eng.train"), "dev": ("valid.txt", "dev.txt", "eng.testa"),
               "test": ("test.txt", "eng.testb")}


def write_corpus(directory: str, num_train: int, num_eval: int, seed: int) -> None:
    """train.txt, valid.txt and test.txt of the generated corpus in ``directory``."""
    os.makedirs(directory, exist_ok=True)
    write_conll(os.path.join(directory, "train.txt"), generate(num_train, seed, unseen_names=False))
    write_conll(os.path.join(directory, "valid.txt"), generate(num_eval, seed + 1, unseen_names=True))
    write_conll(os.path.join(directory, "test.txt"), generate(num_eval, seed + 2, unseen_names=True))


def read_corpus(directory: str) -> Dict[str, List[Sentence]]:
    """The train, dev and test splits of a CoNLL-2003 directory (``train.txt``/``valid.txt``/``test.txt``
    or ``eng.train``/``eng.testa``/``eng.testb``)."""
    splits = {}
    for split, candidates in SPLIT_FILES.items():
        found = [name for name in candidates if os.path.exists(os.path.join(directory, name))]
        if not found:
            raise FileNotFoundError(f"--data {directory}: no {split} file (one of {', '.join(candidates)})")
        splits[split] = read_conll(os.path.join(directory, found[0]))
    return splits
