"""The text side of the synthetic generator: phrasing templates, referring expressions, task texts.

Everything here works from :class:`ImageFacts` (what was really painted: visible instances with
their class, colour word, visible area, centroid, box and neighbourhood), never from the plan,
so every sentence is true of the image. A singular phrase is only produced when it picks out
exactly one visible instance, with a margin (areas, positions, distances) wide enough that a
person looking at the image would agree.

Templates have ids and a ``held_out`` flag. Train and val records use only train templates; the
test split uses only held-out ones, so test measures generalisation to unseen phrasings. A record
built from several templates (an instruction wrapping a referring phrase) carries their ids
joined by ``+`` in ``template_id``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from geopix.answer_form import box_to_text, colour_answer, count_answer, grounding_answer
from geopix.vocabulary import SegVocabulary

# ---------------------------------------------------------------------------------------------
# Templates


@dataclass(frozen=True)
class Template:
    id: str
    text: str
    held_out: bool = False


def _group(prefix: str, train: list[str], held_out: list[str]) -> tuple[Template, ...]:
    return tuple(Template(f"{prefix}.t{i}", text) for i, text in enumerate(train)) + tuple(
        Template(f"{prefix}.h{i}", text, held_out=True) for i, text in enumerate(held_out)
    )


# What the generator writes for one config changes with this number (it is in the pipeline's
# source-step key, so a pipeline regenerates instead of reusing records of another form).
# 2: "segment every X" answers state their count (geopix.answer_form).
# 3: … opening with "Sure," (not the VQA count answer's "There are …").
# 4: 5–9 training phrasings per task instead of 1–3 (held-out ones unchanged).
# 5: + one bare training form per task: the task tag and its slot only ("[segment] ships").
# 6: grounding answers draw the object and state its box: "Sure, it is [SEG…] at {<x1>…}.".
# 7: 6–8 training phrasings per VQA question kind instead of 3–5 (held-out ones unchanged).
# 8: the text is version 7's; every record carries its picture's class_counts (schema.py).
TEXT_VERSION = 8

# The bare form: the task tag followed by the slot alone (the class, the phrase, or nothing). It
# teaches that the tag, not the sentence around it, decides the answer's form: trained on a few
# sentences only, the model answered held-out caption phrasings like segmentations
# (docs/evaluation_history.md). Not used for VQA, whose question kind lives in the sentence.
BARE = {"segment": "{plural}", "refer": "{phrase}", "ground": "{phrase}", "caption": ""}


# Instructions, by task (the task tag and <image> are added by the record builder).
SEGMENT = _group(
    "seg",
    [
        "Segment all {plural}.",
        "Please segment every {label} in the image.",
        "Find all the {plural} and output their masks.",
        "Give me a mask for every {label}.",
        "Mark each {label} in this aerial image with a mask.",
        "Segment each of the {plural} you can find.",
        "Which pixels belong to the {plural}? One mask per {label}, please.",
        "Produce instance masks of all {plural} in the scene.",
        "I need every {label} here segmented.",
        BARE["segment"],
    ],
    ["Can you produce a mask for each {label} you see?", "Outline every {label} in this picture."],
)
REFER = _group(
    "ref",
    [
        "Please segment {phrase}.",
        "Can you segment {phrase} in this image?",
        "What is {phrase} in this image? Please respond with a segmentation mask.",
        "Segment {phrase}.",
        "Return a mask for {phrase}.",
        "Mark {phrase} in the scene with a mask.",
        "I need a segmentation of {phrase}.",
        "Find {phrase} and answer with its mask.",
        BARE["refer"],
    ],
    ["Show me the mask of {phrase}.", "Where is {phrase}? Answer with its mask."],
)
GROUND = _group(
    "gnd",
    [
        "Give the bounding box of {phrase}.",
        "Where is {phrase}? Answer with a box.",
        "Draw a box around {phrase}.",
        "What are the box coordinates of {phrase}?",
        "Find {phrase} and give its bounding box.",
        "Output the box that encloses {phrase}.",
        "Box {phrase} in this aerial image.",
        BARE["ground"],
    ],
    ["Locate {phrase} with a bounding box."],
)
CAPTION = _group(
    "cap",
    [
        "Describe the image in detail",
        "Describe this aerial image in detail.",
        "What does this image show? Describe it.",
        "Give a detailed caption of the scene.",
        "Caption this satellite picture.",
        "Tell me what is in this aerial photo.",
        "Summarise the contents of the image.",
        "Provide a caption for this image.",
        BARE["caption"],
    ],
    ["Write a detailed description of this remote sensing image."],
)
VQA_COUNT = _group(
    "vqa.count",
    [
        "How many {plural} are there in the image?",
        "Count the {plural} in the image.",
        "How many {plural} can you see?",
        "Tell me how many {plural} there are.",
        "Count how many {plural} this aerial image shows.",
        "What is the count of {plural} in this image?",
        "Give the number of {plural} in the scene.",
        "How many {plural} does this aerial image contain?",
    ],
    ["What is the number of {plural} visible here?"],
)
VQA_PRESENCE = _group(
    "vqa.presence",
    [
        "Is there {a_label} in the image?",
        "Are there any {plural} in this image?",
        "Can you see {a_label} here?",
        "Does the scene show any {plural}?",
        "Is {a_label} visible in this aerial image?",
        "Is any {label} present in the scene?",
        "Do you see {a_label} in this picture?",
        "Are {plural} present in this aerial image?",
    ],
    ["Does this image contain {a_label}?"],
)
VQA_COLOUR = _group(
    "vqa.colour",
    [
        "What colour is {phrase}?",
        "What is the colour of {phrase}?",
        "Tell me the colour of {phrase}.",
        "Name the colour of {phrase}.",
        "Say what colour {phrase} is.",
        "What colour is {phrase} in this image?",
    ],
    ["Which colour does {phrase} have?"],
)

# Referring phrases, by kind; each kind belongs to one phrase type of schema.PHRASE_TYPES.
PHRASE_FORMS = {
    "class": _group("cls", ["the {label}", "the only {label}"], ["the single {label} in the image"]),
    "colour": _group(
        "col",
        ["the {colour_adj} {label}", "the {label} with the {colour} {part}"],
        ["the {label} whose {part} is {colour}"],
    ),
    "size_two": _group(
        "size2",
        ["the {larger} of the two {plural}", "the {larger} one of the two {plural}"],
        ["the {label} that is {larger} than the other one"],
    ),
    "size_many": _group(
        "sizeN",
        ["the {largest} {label}", "the {largest} {label} in the image"],
        ["the {label} with the {largest} area"],
    ),
    "region": _group(
        "pos",
        ["the {label} {where}", "the {label} {where} of the image"],
        ["the {label} located {where} of the picture"],
    ),
    "extreme": _group(
        "ext",
        ["the {extreme} {label}", "the {label} nearest the {side} edge"],
        ["the {label} closest to the {side} border of the image"],
    ),
    "pier": _group(
        "pier",
        ["the {label} next to the pier", "the {label} moored at the pier"],
        ["the {label} docked alongside the pier"],
    ),
    "near": _group(
        "near",
        ["the {label} closest to the {ref}", "the {label} nearest the {ref}"],
        ["the {label} that is nearest to the {ref}"],
    ),
    "road": _group("road", ["the {label} on the road"], ["the {label} driving along the road"]),
    "next": _group(
        "next", ["the {label} next to {ref}", "the {label} beside {ref}"], ["the {label} adjacent to {ref}"]
    ),
}
PHRASE_TYPE_OF_KIND = {
    "class": "class",
    "colour": "colour",
    "size_two": "size_rank",
    "size_many": "size_rank",
    "region": "position",
    "extreme": "position",
    "pier": "relation",
    "near": "relation",
    "road": "relation",
    "next": "relation",
}

ALL_TEMPLATES: dict[str, Template] = {
    t.id: t
    for group in (
        SEGMENT,
        REFER,
        GROUND,
        CAPTION,
        VQA_COUNT,
        VQA_PRESENCE,
        VQA_COLOUR,
        *PHRASE_FORMS.values(),
    )
    for t in group
}
HELD_OUT_TEMPLATE_IDS = frozenset(t.id for t in ALL_TEMPLATES.values() if t.held_out)


def template_ids(template_id: str) -> list[str]:
    """The ids of the templates a record's ``template_id`` joins with ``+``."""
    return template_id.split("+")


def _pick(rng: np.random.Generator, group: tuple[Template, ...], held_out: bool) -> Template:
    candidates = [t for t in group if t.held_out == held_out]
    return candidates[int(rng.integers(len(candidates)))]


# ---------------------------------------------------------------------------------------------
# Facts about one image (filled in by the generator from the rendered pixels)

# The text for each class: colour adjective and the part the colour word describes.
COLOUR_ADJ = {"building": "{colour}-roofed"}
COLOUR_PART = {
    "storage_tank": "roof",
    "ship": "deck",
    "small_vehicle": "body",
    "airplane": "fuselage",
    "building": "roof",
    "swimming_pool": "water",
    "tennis_court": "surface",
    "ground_track_field": "track",
}
SCENE_NAMES = {
    "harbour": "a harbour",
    "airport": "an airport apron",
    "residential": "a residential area",
    "industrial": "an industrial site",
    "sports": "a sports ground",
    "rural": "open countryside",
}

# 3 × 3 regions of the image, row-major, with the words that place something in them.
REGION_WHERE = (
    "in the upper left",
    "at the top",
    "in the upper right",
    "on the left",
    "in the centre",
    "on the right",
    "in the lower left",
    "at the bottom",
    "in the lower right",
)
REGION_MARGIN = 0.06  # of the image size: centroids closer than this to a region border are ambiguous
EXTREME_GAP = 0.08  # of the image size: the leftmost must lead the next one by this much
SIZE_RATIO = 1.5  # visible areas must differ by this factor for a size rank to be clear
NEAR_RATIO = 0.6  # the nearest must be at most this fraction of the second-nearest distance
FEATURE_GAP = 10  # px the nearest must lead the second-nearest by, to the water or the road
ON_ROAD = 0.6  # fraction of a vehicle's pixels over the road to call it "on the road"
OFF_ROAD = 0.1


def label(class_name: str) -> str:
    """A class name as words: "storage_tank", "storage-tank" → "storage tank"."""
    return class_name.replace("_", " ").replace("-", " ")


def with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def plural(class_name: str) -> str:
    """English plural of a class name's words (imported class names end in anything)."""
    words = label(class_name)
    if words.endswith(("s", "x", "z", "ch", "sh")):
        return words + "es"
    if words.endswith("y") and len(words) > 1 and words[-2] not in "aeiou":
        return words[:-1] + "ies"
    return words + "s"


@dataclass(frozen=True)
class InstanceFacts:
    class_name: str
    colour: str
    area: int  # visible pixels
    centroid: tuple[float, float]  # x, y in pixels
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels
    at_pier: bool = False
    road_fraction: float = 0.0
    touching: tuple[str, ...] = ()  # classes of other instances within a few pixels
    distance_to: tuple[tuple[str, float], ...] = ()  # ("water" | "road", px from the mask) when present


@dataclass(frozen=True)
class ImageFacts:
    size: int
    scene: str
    instances: tuple[InstanceFacts, ...]
    water_fraction: float = 0.0
    water_side: str | None = None  # "left", "top", ... when one half of the image holds most water
    road_fraction: float = 0.0
    has_pier: bool = False

    def by_class(self) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = {}
        for index, inst in enumerate(self.instances):
            groups.setdefault(inst.class_name, []).append(index)
        return groups


@dataclass(frozen=True)
class Expression:
    """A phrase that picks out exactly one instance."""

    target: int
    kind: str  # key of PHRASE_FORMS
    template: Template
    text: str

    @property
    def phrase_type(self) -> str:
        return PHRASE_TYPE_OF_KIND[self.kind]


@dataclass(frozen=True)
class Exchange:
    """One record's text: the instruction, the answer and the instances the answer segments."""

    task: str
    prompt: str  # without <image> and the task tag
    answer: str
    targets: tuple[int, ...]
    descriptions: tuple[str, ...]
    phrase_type: str | None
    template_id: str


# ---------------------------------------------------------------------------------------------
# Referring expressions


def _region(x: float, y: float, size: int) -> int:
    return min(2, int(3 * y / size)) * 3 + min(2, int(3 * x / size))


def _region_clear(x: float, y: float, size: int) -> bool:
    """The point is at least REGION_MARGIN away from the thirds lines that bound its region."""
    margin = REGION_MARGIN * size
    return all(abs(c - line) >= margin for c in (x, y) for line in (size / 3, 2 * size / 3))


def _near_region(x: float, y: float, region: int, size: int) -> bool:
    """The point lies in ``region`` grown by REGION_MARGIN on every side."""
    margin = REGION_MARGIN * size
    row, col = divmod(region, 3)
    return (
        col * size / 3 - margin <= x < (col + 1) * size / 3 + margin
        and row * size / 3 - margin <= y < (row + 1) * size / 3 + margin
    )


def _candidates(facts: ImageFacts) -> list[tuple[int, str, dict[str, str]]]:
    """(instance, kind, slots) for every phrase that is true of exactly one instance."""
    size = facts.size
    groups = facts.by_class()
    found: list[tuple[int, str, dict[str, str]]] = []
    for name, members in groups.items():
        insts = [facts.instances[i] for i in members]
        if len(members) == 1:
            found.append((members[0], "class", {}))
        colours = Counter(inst.colour for inst in insts)
        for index, inst in zip(members, insts, strict=True):
            if colours[inst.colour] == 1:
                found.append((index, "colour", {"colour": inst.colour}))
        if len(members) >= 2:
            order = sorted(range(len(members)), key=lambda k: insts[k].area)
            areas = [insts[k].area for k in order]
            kind = "size_two" if len(members) == 2 else "size_many"
            if areas[-1] >= SIZE_RATIO * areas[-2]:
                found.append((members[order[-1]], kind, {"larger": "larger", "largest": "largest"}))
            if areas[1] >= SIZE_RATIO * areas[0]:
                found.append((members[order[0]], kind, {"larger": "smaller", "largest": "smallest"}))
            for axis, sides in ((0, ("left", "right")), (1, ("top", "bottom"))):
                coords = sorted(range(len(members)), key=lambda k: insts[k].centroid[axis])
                values = [insts[k].centroid[axis] for k in coords]
                if values[1] - values[0] >= EXTREME_GAP * size:
                    found.append((members[coords[0]], "extreme", _extreme_slots(sides[0])))
                if values[-1] - values[-2] >= EXTREME_GAP * size:
                    found.append((members[coords[-1]], "extreme", _extreme_slots(sides[1])))
        for index, inst in zip(members, insts, strict=True):
            x, y = inst.centroid
            region = _region(x, y, size)
            others = [o for o in insts if o is not inst]
            if _region_clear(x, y, size) and not any(_near_region(*o.centroid, region, size) for o in others):
                found.append((index, "region", {"where": REGION_WHERE[region]}))
        if name == "ship":
            moored = [i for i in members if facts.instances[i].at_pier]
            if len(moored) == 1:
                found.append((moored[0], "pier", {}))
        if name == "small_vehicle":
            on_road = [i for i in members if facts.instances[i].road_fraction >= ON_ROAD]
            off_road = [i for i in members if facts.instances[i].road_fraction <= OFF_ROAD]
            if len(on_road) == 1 and len(on_road) + len(off_road) == len(members):
                found.append((on_road[0], "road", {}))
    found += _near_candidates(facts, groups)
    found += _next_candidates(facts, groups)
    return found


def _next_candidates(
    facts: ImageFacts, groups: dict[str, list[int]]
) -> list[tuple[int, str, dict[str, str]]]:
    """The "X next to Y" phrases: the one X (of several) that touches an instance of class Y."""
    found = []
    for members in groups.values():
        if len(members) < 2:
            continue
        for ref_name in sorted(groups):
            touching = [i for i in members if ref_name in facts.instances[i].touching]
            if len(touching) == 1:
                ref = (
                    f"the {label(ref_name)}" if len(groups[ref_name]) == 1 else with_article(label(ref_name))
                )
                found.append((touching[0], "next", {"ref": ref}))
    return found


def _extreme_slots(side: str) -> dict[str, str]:
    extreme = {"left": "leftmost", "right": "rightmost", "top": "topmost", "bottom": "bottommost"}[side]
    return {"extreme": extreme, "side": side}


def _near_candidates(
    facts: ImageFacts, groups: dict[str, list[int]]
) -> list[tuple[int, str, dict[str, str]]]:
    """The "X closest to Y" phrases: Y is the water, the road or the only one of its class, and X
    is clearly the nearest of its class."""
    found = []
    for name, members in groups.items():
        if len(members) < 2:
            continue
        for feature in ("water", "road"):
            dists = sorted((dict(facts.instances[i].distance_to).get(feature), i) for i in members)
            if dists[0][0] is None:
                continue
            (d1, nearest), (d2, _) = dists[0], dists[1]
            if d2 - d1 >= FEATURE_GAP and d1 <= NEAR_RATIO * d2 and d1 < facts.size / 4:
                found.append((nearest, "near", {"ref": feature}))
    anchors = [(name, members[0]) for name, members in groups.items() if len(members) == 1]
    for ref_name, ref in anchors:
        rx, ry = facts.instances[ref].centroid
        for name, members in groups.items():
            if name == ref_name or len(members) < 2:
                continue
            dists = sorted(
                (float(np.hypot(facts.instances[i].centroid[0] - rx, facts.instances[i].centroid[1] - ry)), i)
                for i in members
            )
            if dists[0][0] <= NEAR_RATIO * dists[1][0]:
                found.append((dists[0][1], "near", {"ref": label(ref_name)}))
    return found


def _render(form: Template, inst: InstanceFacts, slots: dict[str, str]) -> str:
    name = inst.class_name
    colour_adj = COLOUR_ADJ.get(name, "{colour}").format(colour=inst.colour)
    return form.text.format(
        label=label(name), plural=plural(name), colour_adj=colour_adj, part=COLOUR_PART[name], **slots
    )


def referring_expressions(facts: ImageFacts, rng: np.random.Generator, held_out: bool) -> list[Expression]:
    """One expression (in a randomly picked form of the split's templates) per unique phrase."""
    expressions = []
    for target, kind, slots in _candidates(facts):
        form = _pick(rng, PHRASE_FORMS[kind], held_out)
        expressions.append(Expression(target, kind, form, _render(form, facts.instances[target], slots)))
    return expressions


# ---------------------------------------------------------------------------------------------
# Task texts


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _count_phrase(n: int, name: str) -> str:
    return f"one {label(name)}" if n == 1 else f"{n} {plural(name)}"


def _fallback_description(facts: ImageFacts, index: int) -> str:
    name = facts.instances[index].class_name
    n = len(facts.by_class()[name])
    return f"the {label(name)}" if n == 1 else f"one of the {n} {plural(name)}"


def _segment(facts, rng, held_out, name, members, best, run) -> Exchange:
    template = _pick(rng, SEGMENT, held_out)
    descriptions = tuple(best[i].text if i in best else _fallback_description(facts, i) for i in members)
    return Exchange(
        "segment",
        template.text.format(label=label(name), plural=plural(name)),
        count_answer(len(members), label(name), plural(name), run),
        tuple(members),
        descriptions,
        "all_of_class",
        template.id,
    )


def _refer(rng, held_out, expr: Expression, run: str) -> Exchange:
    template = _pick(rng, REFER, held_out)
    return Exchange(
        "refer",
        template.text.format(phrase=expr.text),
        f"Sure, it is {run}.",
        (expr.target,),
        (expr.text,),
        expr.phrase_type,
        f"{template.id}+{expr.template.id}",
    )


def _ground(facts: ImageFacts, rng, held_out, expr: Expression, run: str) -> Exchange:
    template = _pick(rng, GROUND, held_out)
    box = box_to_text(facts.instances[expr.target].box, facts.size, facts.size)
    return Exchange(
        "ground",
        template.text.format(phrase=expr.text),
        grounding_answer(run, box),
        (expr.target,),
        (expr.text,),
        expr.phrase_type,
        f"{template.id}+{expr.template.id}",
    )


def _vqa(
    facts: ImageFacts, rng, held_out, expressions: list[Expression], class_names: list[str], drawn_run: str | None
) -> Exchange:
    """One VQA record: a count, presence or colour question; a colour answer draws the object
    first (``drawn_run``: the seg run to draw it with) or names the colour alone (None)."""
    groups = facts.by_class()
    # A colour question needs a phrase that does not already say the colour.
    describable = [e for e in expressions if e.kind != "colour"]
    kinds = ["count", "presence"] + (["colour"] if describable else [])
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "colour":
        expr = describable[int(rng.integers(len(describable)))]
        template = _pick(rng, VQA_COLOUR, held_out)
        colour = facts.instances[expr.target].colour
        drawn = drawn_run is not None
        return Exchange(
            "vqa",
            template.text.format(phrase=expr.text),
            colour_answer(colour, drawn_run),
            (expr.target,) if drawn else (),
            (expr.text,) if drawn else (),
            expr.phrase_type if drawn else None,  # the phrase places the drawn object (augmentation reads it)
            f"{template.id}+{expr.template.id}",
        )
    # Ask about an absent class now and then, so "no" and zero are answers too.
    present = sorted(groups)
    absent = [n for n in class_names if n not in groups]
    pool = absent if absent and (not present or rng.random() < 0.25) else present
    name = pool[int(rng.integers(len(pool)))]
    n = len(groups.get(name, []))
    if kind == "count":
        template = _pick(rng, VQA_COUNT, held_out)
        if n == 0:
            answer = f"There are no {plural(name)}."
        elif n == 1:
            answer = f"There is one {label(name)}."
        else:
            answer = f"There are {n} {plural(name)}."
    else:
        template = _pick(rng, VQA_PRESENCE, held_out)
        answer = "No." if n == 0 else ("Yes, there is one." if n == 1 else f"Yes, there are {n}.")
    return Exchange(
        "vqa",
        template.text.format(label=label(name), a_label=with_article(label(name)), plural=plural(name)),
        answer,
        (),
        (),
        None,
        template.id,
    )


def caption_text(facts: ImageFacts) -> str:
    """A description that only states what the facts show: scene, counts, layout, water, roads."""
    groups = facts.by_class()
    sentences = [f"This aerial image shows {SCENE_NAMES[facts.scene]}."]
    if groups:
        names = sorted(groups, key=lambda n: (-len(groups[n]), n))
        counts = [_count_phrase(len(groups[n]), n) for n in names]
        sentences.append(f"It contains {_join(counts)}.")
        for name in names:
            members = groups[name]
            regions = {_region(*facts.instances[i].centroid, facts.size) for i in members}
            if len(members) >= 2 and len(regions) == 1:
                where = REGION_WHERE[regions.pop()]
                sentences.append(f"All the {plural(name)} are {where}.")
    else:
        sentences.append("No objects of interest are visible.")
    if facts.water_fraction > 0.03:
        where = f" on the {facts.water_side} side" if facts.water_side else ""
        sentences.append(f"Water covers about {_percent(facts.water_fraction)} of the image{where}.")
    if facts.has_pier:
        sentences.append("A pier reaches out into the water.")
    moored = sum(1 for inst in facts.instances if inst.class_name == "ship" and inst.at_pier)
    if moored:
        sentences.append(
            f"{_count_phrase(moored, 'ship').capitalize()} {'is' if moored == 1 else 'are'} moored at a pier."
        )
    if facts.road_fraction > 0.02:
        sentences.append("A road runs through the scene.")
    if facts.instances:
        largest = max(facts.instances, key=lambda inst: inst.area)
        where = REGION_WHERE[_region(*largest.centroid, facts.size)]
        sentences.append(f"The largest object is {with_article(label(largest.class_name))} {where}.")
    return " ".join(sentences)


def _percent(fraction: float) -> str:
    return f"{round(fraction * 10) * 10 or 5} percent" if fraction >= 0.05 else "a small part"


def image_exchanges(
    facts: ImageFacts,
    rng: np.random.Generator,
    held_out: bool,
    class_names: list[str],
    seg_vocab: SegVocabulary,
    vqa_colour_drawn: bool = False,
) -> list[Exchange]:
    """The records of one image: up to 2 segment, 2 refer, 1 ground, 1 vqa and 1 caption; each
    target of a segment or refer answer is one ``seg_vocab`` run. ``vqa_colour_drawn``: a colour
    question's answer draws the asked object (one run, the record's target) before its colour."""
    run = seg_vocab.run
    expressions = referring_expressions(facts, rng, held_out)
    # The description of an instance in a segment record: its first phrase that is not its class.
    best: dict[int, Expression] = {}
    for expr in sorted(expressions, key=lambda e: e.kind == "class"):
        best.setdefault(expr.target, expr)
    exchanges: list[Exchange] = []

    groups = facts.by_class()
    names = sorted(groups)
    for pos in rng.permutation(len(names))[:2]:
        name = names[int(pos)]
        exchanges.append(_segment(facts, rng, held_out, name, groups[name], best, run))

    # Balance phrase types: pick a type first, then one of its expressions.
    by_type: dict[str, list[Expression]] = {}
    for expr in expressions:
        by_type.setdefault(expr.phrase_type, []).append(expr)
    types = [sorted(by_type)[int(k)] for k in rng.permutation(len(by_type))]
    if types:
        # Two refer records, one ground record, each on another phrase type while there are enough.
        for k, phrase_type in enumerate([*types[:2], types[2 % len(types)]]):
            if k == 1 and len(types) < 2:
                continue
            options = by_type[phrase_type]
            expr = options[int(rng.integers(len(options)))]
            exchanges.append(
                _refer(rng, held_out, expr, run) if k < 2 else _ground(facts, rng, held_out, expr, run)
            )

    exchanges.append(_vqa(facts, rng, held_out, expressions, class_names, run if vqa_colour_drawn else None))
    template = _pick(rng, CAPTION, held_out)
    exchanges.append(Exchange("caption", template.text, caption_text(facts), (), (), None, template.id))
    return exchanges
