"""The synthetic scene model: vocabulary, held-out combinations, scene sampling, captions and hard captions.

A scene has two described *groups* of identical objects, a subject and a reference, in a spatial relation
("two small red matte striped circles to the left of a large blue metallic solid square"), plus zero to two
undescribed *distractors*. Every object has a shape, a colour, a size, a material and a texture.

Guarantees that make every hard caption false for its image (tests check them):

- the subject and the reference differ in shape and in colour;
- a distractor shares neither its shape nor its colour with either group, so a phrase built from a group's
  shape or colour can only refer to that group;
- a replacement colour or shape is one that appears nowhere in the scene.

Held-out combinations (:class:`HeldOut`) are derived from the seed alone: some colour-shape pairs and some
(subject shape, relation, reference shape) triples never occur in the ``train`` split, and about half of the
``test`` items contain at least one of them.

A :class:`World` (presets in :data:`WORLDS`) says which sizes, materials, textures and relations occur, how large
objects are drawn, and how many objects a scene holds: ``default`` is the benchmark; ``simple`` (one material, one
texture, larger objects, at most two per group and one distractor) is the calibration world where perception is
easy and only colour, size and shape vary; ``pair`` is the issue's first calibration check (two large objects,
one of each group, no distractor, always "to the left of"), where only colour and shape vary and word order alone
says which object is where; ``pair-relations`` is ``pair`` with the benchmark's four relations, so that binding a
colour to its object takes its shape or the relation word; ``pair-relations-unseen`` is ``pair-relations`` whose
captions also give each object an age ("a large old red ..."), drawn at random and never drawn in the image, as
natural captions state what a picture cannot show ("an old car", "a modern kitchen"): changing it makes a
negative that is true of the image, so it is where choosing *which* word to change (concreteness) can matter.
Its items are ``pair-relations``' items (same scenes, images and hard captions) with the ages added to every
caption (:func:`with_ages`, from a random stream of their own).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
PLURALS: dict[str, str] = {s: s + "es" if s.endswith("s") else s + "s" for s in SHAPES}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (55, 95, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 205),
    "orange": (245, 135, 25),
    "cyan": (40, 210, 220),
    "white": (240, 240, 240),
}
SIZES: tuple[str, ...] = ("small", "large")
MATERIALS: tuple[str, ...] = ("matte", "metallic")
TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted")
#: relation phrase -> its converse (the phrase that holds with subject and reference exchanged)
RELATIONS: dict[str, str] = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}
#: age words of ``pair-relations-unseen``: stated by captions, never rendered; ConcretePlant's lexicon rates
#: them low (within-adjective concreteness percentiles 0.08 to 0.22, against 0.55 to 0.98 for the colours)
UNSEEN_AGES: tuple[str, ...] = ("old", "new", "young", "modern", "vintage")
COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three"}
#: object radius as a fraction of the image side, per size word
RADIUS_FRACTION: dict[str, float] = {"small": 0.075, "large": 0.125}
MAX_COUNT = 3
#: the attributes a caption states for every group, in caption order (the shape comes last)
ATTRIBUTES: tuple[str, ...] = ("size", "colour", "material", "texture")
_VALUES: dict[str, tuple[str, ...]] = {
    "size": SIZES,
    "colour": tuple(COLOURS),
    "material": MATERIALS,
    "texture": TEXTURES,
    "shape": SHAPES,
}
#: the kinds of hard caption, each with one false change to the true caption
HARD_KINDS: tuple[str, ...] = (
    "attribute_swap",
    "object_swap",
    "relation_swap",
    "attribute_replace",
    "object_replace",
    "count_change",
)
SPLITS: tuple[str, ...] = ("train", "test")


@dataclass(frozen=True)
class World:
    """What scenes of a world may contain and how large objects are drawn.

    Captions always state all of :data:`ATTRIBUTES` (a single-valued attribute is the same word everywhere),
    so every world's captions have the same grammar.
    """

    name: str = "default"
    sizes: tuple[str, ...] = SIZES
    materials: tuple[str, ...] = MATERIALS
    textures: tuple[str, ...] = TEXTURES
    #: the relation phrases scenes use (a subset of :data:`RELATIONS`)
    relations: tuple[str, ...] = tuple(RELATIONS)
    #: object radius as a fraction of the image side, per size word
    radius_fraction: tuple[tuple[str, float], ...] = tuple(RADIUS_FRACTION.items())
    max_count: int = MAX_COUNT
    max_distractors: int = 2
    #: words captions give every described group that images never show (after the size); empty: none
    ages: tuple[str, ...] = ()

    def values(self, attribute: str) -> tuple[str, ...]:
        """The values ``attribute`` takes in this world (``"size"``, ``"colour"``, ``"material"``, ...)."""
        own = {"size": self.sizes, "material": self.materials, "texture": self.textures}
        return own.get(attribute) or _VALUES[attribute]

    @property
    def attributes(self) -> tuple[str, ...]:
        """The attributes of :data:`ATTRIBUTES` that take more than one value here, in caption order."""
        return tuple(a for a in ATTRIBUTES if len(self.values(a)) > 1)


#: the worlds ``slipform make-shards --world`` and ``slipform experiment --world`` accept
WORLDS: dict[str, World] = {
    "default": World(),
    "simple": World(
        name="simple",
        materials=("matte",),
        textures=("solid",),
        radius_fraction=(("small", 0.11), ("large", 0.17)),
        max_count=2,
        max_distractors=1,
    ),
    "pair": World(
        name="pair",
        sizes=("large",),
        materials=("matte",),
        textures=("solid",),
        relations=("to the left of",),
        radius_fraction=(("large", 0.17),),
        max_count=1,
        max_distractors=0,
    ),
}
#: ``pair`` with the four relations of the benchmark: word order alone no longer says where an object is
WORLDS["pair-relations"] = replace(WORLDS["pair"], name="pair-relations", relations=tuple(RELATIONS))
#: ``pair-relations`` whose captions state an age per object that the image never shows
WORLDS["pair-relations-unseen"] = replace(WORLDS["pair-relations"], name="pair-relations-unseen", ages=UNSEEN_AGES)
DEFAULT_WORLD = WORLDS["default"]


def get_world(world: str | World) -> World:
    """The :class:`World` named ``world`` (a :class:`World` is returned as is); ``ValueError`` if unknown."""
    if isinstance(world, World):
        return world
    if world not in WORLDS:
        raise ValueError(f"world must be one of {', '.join(WORLDS)}, got {world!r}")
    return WORLDS[world]


class LayoutError(RuntimeError):
    """Raised when a scene's objects do not fit on the canvas."""


@dataclass(frozen=True)
class Group:
    """``count`` identical objects described by one noun phrase."""

    shape: str
    colour: str
    size: str
    material: str
    texture: str
    count: int = 1
    #: an unseen word (``World.ages``); "" states none
    age: str = ""

    def phrase(self) -> str:
        """The noun phrase, e.g. ``"two small red matte striped circles"`` (``"a large old red ..."`` with an age)."""
        noun = self.shape if self.count == 1 else PLURALS[self.shape]
        words = [self.size, *([self.age] if self.age else []), self.colour, self.material, self.texture, noun]
        article = COUNT_WORDS[self.count]
        if article == "a" and words[0][0] in "aeiou":
            article = "an"
        return " ".join([article, *words])


@dataclass(frozen=True)
class Placed:
    """One rendered object: its group's attributes and its centre and radius in pixels."""

    shape: str
    colour: str
    size: str
    material: str
    texture: str
    x: float
    y: float
    radius: float
    role: str  # "subject", "reference" or "distractor"


@dataclass(frozen=True)
class Scene:
    """A scene: two described groups in a relation, the distractors' attributes, and (after layout) objects."""

    subject: Group
    relation: str
    reference: Group
    distractors: tuple[Group, ...] = ()
    heldout: tuple[str, ...] = ()  # which held-out combinations the scene contains, e.g. "colour_shape:red circle"
    objects: tuple[Placed, ...] = field(default=())

    def caption(self) -> str:
        """The true caption."""
        return caption_of(self.subject, self.relation, self.reference)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable description (used as the ``json`` entry of a sample)."""
        objects = [dict(vars(o), x=round(o.x, 2), y=round(o.y, 2), radius=round(o.radius, 2)) for o in self.objects]
        return {
            "subject": _group_json(self.subject),
            "relation": self.relation,
            "reference": _group_json(self.reference),
            "distractors": [_group_json(d) for d in self.distractors],
            "heldout": list(self.heldout),
            "objects": objects,
        }


def _group_json(group: Group) -> dict[str, Any]:
    """A group's fields; ``age`` only when it states one (so worlds without ages write what they always wrote)."""
    fields = dict(vars(group))
    if not fields["age"]:
        del fields["age"]
    return fields


def caption_of(subject: Group, relation: str, reference: Group) -> str:
    """``"<subject phrase> <relation> <reference phrase>"``."""
    return f"{subject.phrase()} {relation} {reference.phrase()}"


@dataclass(frozen=True)
class HeldOut:
    """The combinations that never occur in ``train``: colour-shape pairs and relation triples.

    A relation triple ``(subject shape, relation, reference shape)`` is held out together with its converse
    ``(reference shape, converse relation, subject shape)``, which states the same fact.
    """

    colour_shape: frozenset[tuple[str, str]]
    relation_triples: frozenset[tuple[str, str, str]]

    @classmethod
    def from_seed(cls, seed: int) -> HeldOut:
        """The held-out rule of ``seed``: one colour per shape (all distinct) and 12 relation triples (+ converses)."""
        rng = random.Random(f"slipform-heldout-{seed}")
        colours = list(COLOURS)
        rng.shuffle(colours)
        pairs = frozenset((colours[i], shape) for i, shape in enumerate(SHAPES))
        triples: set[tuple[str, str, str]] = set()
        candidates = [(a, r, b) for a in SHAPES for r in RELATIONS for b in SHAPES if a != b]
        rng.shuffle(candidates)
        for a, r, b in candidates:
            if len(triples) >= 24:
                break
            if (a, r, b) not in triples:
                triples |= {(a, r, b), (b, RELATIONS[r], a)}
        return cls(pairs, frozenset(triples))

    def combos_in(self, subject: Group, relation: str, reference: Group, distractors: tuple[Group, ...]) -> list[str]:
        """The held-out combinations present in a scene, as readable tags."""
        found = [
            f"colour_shape:{g.colour} {g.shape}"
            for g in (subject, reference, *distractors)
            if (g.colour, g.shape) in self.colour_shape
        ]
        if (subject.shape, relation, reference.shape) in self.relation_triples:
            found.append(f"relation:{subject.shape} {relation} {reference.shape}")
        return sorted(set(found))

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable form."""
        return {
            "colour_shape": sorted(" ".join(p) for p in self.colour_shape),
            "relation_triples": sorted(" | ".join(t) for t in self.relation_triples),
        }


def _random_group(rng: random.Random, shape: str, colour: str, count: int, world: World) -> Group:
    return Group(
        shape=shape,
        colour=colour,
        size=rng.choice(world.sizes),
        material=rng.choice(world.materials),
        texture=rng.choice(world.textures),
        count=count,
    )


def with_ages(scene: Scene, rng: random.Random, world: World) -> Scene:
    """``scene`` with an age from ``world.ages`` drawn by ``rng`` for each described group (unchanged when the
    world has none). Ages are never laid out or rendered, and callers draw them from their own random stream, so
    a world with ages has exactly the scenes and images of the same world without them."""
    if not world.ages:
        return scene
    subject = replace(scene.subject, age=rng.choice(world.ages))
    return replace(scene, subject=subject, reference=replace(scene.reference, age=rng.choice(world.ages)))


def sample_scene(rng: random.Random, split: str, heldout: HeldOut, world: World = DEFAULT_WORLD) -> Scene:
    """Sample a scene's content (no layout) for ``split`` in ``world``.

    ``train`` scenes contain no held-out combination; ``test`` scenes contain at least one with probability 1/2
    and are otherwise drawn exactly like ``train`` scenes (seen combinations only).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    want_heldout = split == "test" and rng.random() < 0.5
    for _ in range(1000):
        relation = rng.choice(world.relations)
        if want_heldout and rng.random() < 0.5:  # force a held-out colour-shape pair on one group
            colour_a, shape_a = rng.choice(sorted(heldout.colour_shape))
            shape_b = rng.choice([s for s in SHAPES if s != shape_a])
            colour_b = rng.choice([c for c in COLOURS if c != colour_a])
        else:
            shape_a, shape_b = rng.sample(SHAPES, 2)
            colour_a, colour_b = rng.sample(list(COLOURS), 2)
        subject = _random_group(rng, shape_a, colour_a, rng.randint(1, world.max_count), world)
        reference = _random_group(rng, shape_b, colour_b, rng.randint(1, world.max_count), world)
        if rng.random() < 0.5:
            subject, reference = reference, subject
        free_shapes = [s for s in SHAPES if s not in (subject.shape, reference.shape)]
        free_colours = [c for c in COLOURS if c not in (subject.colour, reference.colour)]
        distractors = tuple(
            _random_group(rng, rng.choice(free_shapes), rng.choice(free_colours), 1, world)
            for _ in range(rng.randint(0, world.max_distractors))
        )
        combos = heldout.combos_in(subject, relation, reference, distractors)
        if bool(combos) != want_heldout:
            continue
        return Scene(subject, relation, reference, distractors, tuple(combos))
    raise RuntimeError("could not sample a scene that satisfies the held-out rule; this is a bug")


def _scene_values(scene: Scene, attribute: str) -> set[str]:
    groups = (scene.subject, scene.reference, *scene.distractors)
    return {getattr(g, attribute) for g in groups}


def hard_captions(scene: Scene, rng: random.Random, world: World = DEFAULT_WORLD) -> dict[str, dict[str, Any]]:
    """One false caption of each kind in :data:`HARD_KINDS`, each differing from the truth in one stated way
    (replacements stay inside ``world``'s values).

    Returns ``{kind: {"caption": str, "group": "subject"|"reference"|None, "attribute": str|None,
    "old": ..., "new": ...}}``; for swaps ``old``/``new`` hold the two exchanged values.
    """
    subj, ref, rel = scene.subject, scene.reference, scene.relation
    out: dict[str, dict[str, Any]] = {}

    differing = [a for a in world.attributes if getattr(subj, a) != getattr(ref, a)]  # colour always differs
    attr = rng.choice(differing)
    a_val, b_val = getattr(subj, attr), getattr(ref, attr)
    out["attribute_swap"] = {
        "caption": caption_of(replace(subj, **{attr: b_val}), rel, replace(ref, **{attr: a_val})),
        "group": None,
        "attribute": attr,
        "old": [a_val, b_val],
        "new": [b_val, a_val],
    }
    out["object_swap"] = {
        "caption": caption_of(replace(subj, shape=ref.shape), rel, replace(ref, shape=subj.shape)),
        "group": None,
        "attribute": "shape",
        "old": [subj.shape, ref.shape],
        "new": [ref.shape, subj.shape],
    }
    # the converse relation; a world without it (``pair``) exchanges the two groups instead, which states the
    # converse fact in the world's own words ("B to the left of A" for "A to the left of B")
    converse = RELATIONS[rel] in world.relations
    out["relation_swap"] = {
        "caption": caption_of(subj, RELATIONS[rel], ref) if converse else caption_of(ref, rel, subj),
        "group": None,
        "attribute": "relation",
        "old": rel,
        "new": RELATIONS[rel] if converse else f"{rel} (groups exchanged)",
    }

    def change(kind: str, attribute: str, choices: Any) -> None:
        role = rng.choice(("subject", "reference"))
        group = subj if role == "subject" else ref
        old = getattr(group, attribute)
        new = rng.choice([v for v in choices(group) if v != old])
        changed = replace(group, **{attribute: new})
        caption = caption_of(changed, rel, ref) if role == "subject" else caption_of(subj, rel, changed)
        out[kind] = {"caption": caption, "group": role, "attribute": attribute, "old": old, "new": new}

    used_colours, used_shapes = _scene_values(scene, "colour"), _scene_values(scene, "shape")
    replace_attr = rng.choice(world.attributes)
    if replace_attr == "colour":
        change("attribute_replace", "colour", lambda g: [c for c in COLOURS if c not in used_colours])
    else:
        change("attribute_replace", replace_attr, lambda g: world.values(replace_attr))
    change("object_replace", "shape", lambda g: [s for s in SHAPES if s not in used_shapes])
    change("count_change", "count", lambda g: list(COUNT_WORDS))
    return {kind: out[kind] for kind in HARD_KINDS}


def layout_scene(scene: Scene, rng: random.Random, image_size: int, world: World = DEFAULT_WORLD) -> Scene:
    """Place every object of ``scene`` on an ``image_size`` square canvas so that the relation holds
    (object radii from ``world.radius_fraction``).

    The canvas is split along the relation's axis at a random point; every subject object lies entirely on
    one side of the split and every reference object on the other, none overlap, and distractors go anywhere
    free. Returns a copy of ``scene`` with ``objects`` filled in; raises :class:`LayoutError` when 100
    attempts fail (rare: callers sample a new scene).
    """
    size = float(image_size)
    radius = {name: fraction * size for name, fraction in world.radius_fraction}
    horizontal = rel_is_horizontal(scene.relation)
    subject_first = scene.relation in ("to the left of", "above")
    for _ in range(100):
        split = rng.uniform(0.42, 0.58) * size
        gap = 0.03 * size
        placed: list[Placed] = []
        ok = True
        for role, group in (("subject", scene.subject), ("reference", scene.reference)):
            r = radius[group.size]
            first_side = (role == "subject") == subject_first
            lo_main, hi_main = (r + 1, split - gap - r) if first_side else (split + gap + r, size - 1 - r)
            for _ in range(group.count):
                if not _place(rng, placed, group, role, r, lo_main, hi_main, (r + 1, size - 1 - r), horizontal):
                    ok = False
                    break
            if not ok:
                break
        if not ok:
            continue
        for group in scene.distractors:
            r = radius[group.size]
            if not _place(rng, placed, group, "distractor", r, r + 1, size - 1 - r, (r + 1, size - 1 - r), True):
                ok = False
                break
        if ok:
            return replace(scene, objects=tuple(placed))
    raise LayoutError(f"could not lay out {scene.caption()!r} on a {image_size}px canvas")


def rel_is_horizontal(relation: str) -> bool:
    """Whether ``relation`` is about the x axis (left/right) rather than the y axis (above/below)."""
    return relation in ("to the left of", "to the right of")


def _place(
    rng: random.Random,
    placed: list[Placed],
    group: Group,
    role: str,
    r: float,
    lo_main: float,
    hi_main: float,
    cross: tuple[float, float],
    horizontal: bool,
) -> bool:
    if hi_main < lo_main:
        return False
    for _ in range(60):
        main, other = rng.uniform(lo_main, hi_main), rng.uniform(*cross)
        x, y = (main, other) if horizontal else (other, main)
        if all((x - p.x) ** 2 + (y - p.y) ** 2 > (r + p.radius + 1.5) ** 2 for p in placed):
            placed.append(Placed(group.shape, group.colour, group.size, group.material, group.texture, x, y, r, role))
            return True
    return False
