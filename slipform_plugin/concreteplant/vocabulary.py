"""Hand-curated replacement categories: which words may stand in for which.

A replacement must be a *different lemma of the same part of speech and category* (a dog becomes a cat, not a
toilet; red becomes blue, not wooden), and it must have a concreteness rating of its own: words missing from
the norms are dropped when the lexicon loads (:mod:`slipform_plugin.concreteplant.lexicon`).

Words are lemmas (singular nouns, base-form verbs). Irregular inflections are listed in the tables at the end.
"""

from __future__ import annotations


def _words(text: str) -> tuple[str, ...]:
    return tuple(word.replace("_", " ") for word in text.split())


#: Object categories (nouns). ``_`` joins a multiword lemma ("hot_dog" -> "hot dog").
NOUN_CATEGORIES: dict[str, tuple[str, ...]] = {
    "person": _words(
        "man woman boy girl child kid baby person guy lady gentleman teenager player skier surfer skateboarder "
        "snowboarder chef cook officer policeman soldier worker rider batter catcher pitcher umpire tourist "
        "student farmer doctor nurse bride groom mother father daughter son wife husband toddler cowboy"
    ),
    "animal": _words(
        "dog cat horse cow sheep goat pig elephant giraffe zebra bear bird duck goose chicken pigeon seagull owl "
        "parrot eagle lion tiger monkey deer mouse rabbit squirrel kitten puppy calf lamb pony donkey camel "
        "fox wolf turtle frog snake swan dolphin whale crab butterfly bee bull ox buffalo"
    ),
    "vehicle": _words(
        "car truck bus train bicycle bike motorcycle scooter boat ship airplane plane jet helicopter van taxi "
        "tractor trolley tram cart jeep sailboat canoe kayak wagon ambulance limousine"
    ),
    "food": _words(
        "pizza sandwich burger hamburger hot_dog donut doughnut cake cookie bread bagel banana apple orange "
        "carrot broccoli tomato potato onion pepper salad soup pasta rice egg cheese meat steak sausage muffin "
        "pie cupcake fruit vegetable lettuce cucumber lemon strawberry grape pineapple mushroom corn bean taco "
        "burrito noodle pancake waffle cereal yogurt pastry dessert omelet"
    ),
    "drink": _words("coffee tea wine beer juice milk soda lemonade"),
    "furniture": _words(
        "chair table couch sofa bed desk bench shelf cabinet dresser stool bookshelf counter armchair ottoman"
    ),
    "household": _words(
        "cup mug glass plate bowl fork knife spoon bottle jar pot pan vase basket box bag tray napkin towel "
        "pillow blanket lamp clock mirror candle umbrella book toothbrush scissors remote phone laptop "
        "computer keyboard monitor television camera oven microwave refrigerator fridge sink toilet stove "
        "faucet bathtub shower suitcase cell_phone teddy_bear doll toy teapot kettle"
    ),
    "clothing": _words(
        "shirt jacket coat hat cap helmet dress skirt tie scarf glove shoe boot sock jeans pants shorts "
        "sweater hoodie vest uniform suit glasses sunglasses backpack purse apron wetsuit"
    ),
    "sports": _words(
        "ball frisbee kite surfboard skateboard snowboard ski racket bat net tennis_racket baseball football "
        "soccer_ball paddle sled"
    ),
    "structure": _words(
        "building house tower bridge fence wall window door roof sign pole hydrant fire_hydrant statue "
        "fountain church tent barn shed gate stairs chimney traffic_light parking_meter lamppost billboard"
    ),
    "place": _words(
        "street road sidewalk park beach field mountain hill river lake ocean sea forest station airport "
        "kitchen bathroom bedroom room restaurant store market yard garden lawn desert city farm pasture "
        "court track runway harbor parking_lot highway"
    ),
    "nature": _words("tree bush flower grass snow sand rock sky cloud plant leaf wave water dirt mud ice"),
    "body": _words("hand head face arm leg foot eye mouth ear hair nose tail finger beard wing"),
    "shape": _words(
        "circle square triangle diamond star cross rectangle heart oval hexagon pentagon cube sphere cylinder cone "
        "pyramid ring arrow crescent"
    ),
}

#: Nouns never changed as objects: relational or container nouns ("in front of", "a group of").
NOUN_STOPLIST: frozenset[str] = frozenset(
    _words(
        "front top side middle background foreground view picture image photo photograph couple group lot "
        "bunch pair piece slice kind type variety number area way part bottom edge end corner center centre "
        "close closeup shot scene camera_angle distance direction line row set lots other others one thing "
        "something someone time day night while air left right"
    )
)

#: Nouns that head "<noun> of <phrase>" ("a slice of pizza"): the whole phrase is the object that moves in a
#: swap; the noun itself is never replaced. (Concrete containers such as "plate" stay objects; their
#: "of" phrases are swap variants.)
CONTAINER_NOUNS: frozenset[str] = frozenset(
    _words(
        "group pair piece slice couple bunch type kind lot lots variety set row herd flock pile stack loaf "
        "handful crowd team line cluster collection display assortment picture photo photograph image"
    )
)

#: Attribute categories (adjectives, and the nouns used as modifiers such as "wooden", "metal", "chocolate").
ATTRIBUTE_CATEGORIES: dict[str, tuple[str, ...]] = {
    "colour": _words(
        "red orange yellow green blue purple pink brown black white gray grey silver gold tan beige maroon cyan "
        "magenta violet teal navy turquoise lavender indigo crimson"
    ),
    "material": _words(
        "wooden metal plastic glass stone brick leather paper concrete steel cotton wool ceramic marble "
        "wicker iron wood cement rubber tile granite bamboo straw denim silk velvet fur porcelain tin copper "
        "bronze aluminum foam cardboard clay chrome brass matte metallic"
    ),
    "size": _words("small large big little tiny huge giant tall short long wide narrow"),
    "shape": _words("round square rectangular circular triangular oval flat curved"),
    "texture": _words("smooth rough soft hard fluffy furry shiny wet dry"),
    "pattern": _words("striped spotted checkered plaid floral dotted solid"),
    "age": _words("young old new antique modern vintage"),
    "state": _words("open closed empty full clean dirty broken lit dark bright messy neat"),
    "food_state": _words("hot cold fresh frozen cooked raw ripe sliced fried grilled toasted"),
    "flavour": _words("chocolate vanilla cherry"),
    "weather": _words("sunny cloudy snowy rainy foggy grassy sandy rocky busy crowded wooded"),
    "side": _words("left right"),
    "sameness": _words("different identical similar matching"),
}

#: The role of an attribute word (its category above: "colour", "size", "material", "pattern" ...). A swap of
#: attributes between two noun phrases exchanges words of the same role ("red" with "blue", not with "striped").
ATTRIBUTE_ROLES: dict[str, str] = {}
for _category, _members in ATTRIBUTE_CATEGORIES.items():
    for _word in _members:
        ATTRIBUTE_ROLES.setdefault(_word, _category)
del _category, _members, _word

#: Spatial and other relational prepositions. Multiword ones are matched as one unit.
PREPOSITION_CATEGORIES: dict[str, tuple[str, ...]] = {
    "spatial": _words(
        "on under above below beside behind near in inside outside over across along around through "
        "against beneath into onto atop by next_to in_front_of on_top_of underneath toward towards "
        "past at to_the_left_of to_the_right_of on_the_left_of on_the_right_of"
    ),
    "accompaniment": _words("with without"),
}

#: Verb categories (relations that are actions). Base forms.
VERB_CATEGORIES: dict[str, tuple[str, ...]] = {
    "posture": _words("sit stand lie lay kneel lean squat crouch hang rest sleep"),
    "motion": _words(
        "walk run jump ride fly drive swim ski surf skate climb cross float race chase follow approach pull push carry"
    ),
    "manual": _words(
        "hold eat drink cut throw catch hit kick play read watch look use wear brush cook feed pet hug kiss "
        "grab touch pick wash open close slice serve prepare"
    ),
    "perception": _words("watch look stare talk smile laugh wait pose"),
}

#: Multiword prepositions have no norm: each is rated as its most telling word.
MULTIWORD_PREPOSITION_RATED_AS: dict[str, str] = {
    "next to": "next",
    "in front of": "front",
    "on top of": "top",
    "to the left of": "left",
    "to the right of": "right",
    "on the left of": "left",
    "on the right of": "right",
}

#: Spatial relation -> its converse relations, best first (the relation that holds with subject and object
#: exchanged: "A to the left of B" is "B to the right of A"). A relation replacement offers the converse first.
#: Relations without a clear direction ("on", "in", "near", "with") keep a random replacement of their category.
CONVERSE_RELATIONS: dict[str, tuple[str, ...]] = {
    "to the left of": ("to the right of",),
    "to the right of": ("to the left of",),
    "on the left of": ("on the right of",),
    "on the right of": ("on the left of",),
    "above": ("below", "under", "beneath"),
    "below": ("above", "over", "on top of"),
    "over": ("under", "below", "beneath"),
    "under": ("on top of", "above", "over"),
    "beneath": ("on top of", "above", "over"),
    "underneath": ("on top of", "above", "over"),
    "on top of": ("under", "beneath", "underneath"),
    "atop": ("under", "beneath", "underneath"),
    "in front of": ("behind",),
    "behind": ("in front of",),
    "inside": ("outside",),
    "outside": ("inside",),
}

VERB_STOPLIST: frozenset[str] = frozenset(_words("be have do get make take go come seem appear show"))

#: Numerals (count changes). Values decide singular/plural agreement.
NUMBER_WORDS: dict[str, int] = {
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "several": 3,
    "many": 5,
}

IRREGULAR_PLURALS: dict[str, str] = {
    "man": "men",
    "woman": "women",
    "child": "children",
    "person": "people",
    "foot": "feet",
    "tooth": "teeth",
    "mouse": "mice",
    "goose": "geese",
    "sheep": "sheep",
    "deer": "deer",
    "fish": "fish",
    "ox": "oxen",
    "knife": "knives",
    "leaf": "leaves",
    "shelf": "shelves",
    "wolf": "wolves",
    "calf": "calves",
    "scarf": "scarves",
    "wife": "wives",
    "glasses": "glasses",
    "sunglasses": "sunglasses",
    "jeans": "jeans",
    "pants": "pants",
    "shorts": "shorts",
    "scissors": "scissors",
    "stairs": "stairs",
    "policeman": "policemen",
    "gentleman": "gentlemen",
    "bus": "buses",
    "cactus": "cacti",
    "potato": "potatoes",
    "tomato": "tomatoes",
    "buffalo": "buffalo",
    "hair": "hair",
}

#: base -> (past, past participle) for irregular verbs in the categories.
IRREGULAR_VERBS: dict[str, tuple[str, str]] = {
    "sit": ("sat", "sat"),
    "stand": ("stood", "stood"),
    "lie": ("lay", "lain"),
    "lay": ("laid", "laid"),
    "kneel": ("knelt", "knelt"),
    "hang": ("hung", "hung"),
    "sleep": ("slept", "slept"),
    "run": ("ran", "run"),
    "ride": ("rode", "ridden"),
    "fly": ("flew", "flown"),
    "drive": ("drove", "driven"),
    "swim": ("swam", "swum"),
    "hold": ("held", "held"),
    "eat": ("ate", "eaten"),
    "drink": ("drank", "drunk"),
    "cut": ("cut", "cut"),
    "throw": ("threw", "thrown"),
    "catch": ("caught", "caught"),
    "hit": ("hit", "hit"),
    "read": ("read", "read"),
    "wear": ("wore", "worn"),
    "feed": ("fed", "fed"),
    "put": ("put", "put"),
}

#: One-syllable verbs whose final consonant doubles before -ing/-ed.
DOUBLING_VERBS: frozenset[str] = frozenset(
    [
        "sit",
        "run",
        "swim",
        "cut",
        "hit",
        "put",
        "stop",
        "shop",
        "dig",
        "jog",
        "grab",
        "hug",
        "drag",
        "wag",
        "nap",
        "sip",
        "skip",
        "slip",
        "step",
        "chop",
        "clap",
        "wrap",
        "plan",
        "pet",
        "get",
        "set",
        "let",
        "bat",
        "pat",
        "hop",
        "trim",
        "tip",
        "squat",
    ]
)

#: Words too close to stand in for each other (a replacement must change what is seen).
SYNONYM_GROUPS: tuple[frozenset[str], ...] = tuple(
    frozenset(group.replace("_", " ").split())
    for group in (
        "bike bicycle",
        "plane airplane jet",
        "donut doughnut",
        "fridge refrigerator",
        "couch sofa armchair",
        "burger hamburger",
        "phone cell_phone",
        "kid child toddler baby",
        "man guy gentleman policeman officer",
        "woman lady",
        "hat cap",
        "television monitor computer laptop",
        "cup mug glass",
        "dog puppy",
        "cat kitten",
        "cow calf bull ox buffalo",
        "horse pony",
        "sheep lamb",
        "boat ship sailboat canoe kayak",
        "car taxi jeep",
        "truck van",
        "train trolley tram",
        "bird pigeon seagull",
        "rock stone",
        "road street highway",
        "sea ocean",
        "hill mountain",
        "pants jeans",
        "shoe boot",
        "bag purse backpack",
        "jacket coat",
        "sweater hoodie",
        "field pasture lawn yard",
        "cookie pastry dessert",
        "gray grey silver",
        "tan beige brown",
        "big large huge giant",
        "small little tiny",
        "tall long",
        "round circular",
        "square rectangular",
        "old antique vintage",
        "new modern",
        "dark black",
        "lie lay rest sleep",
        "look watch stare",
        "hold carry grab",
        "on atop onto on_top_of",
        "under beneath below underneath",
        "near by beside next_to at",
        "to_the_left_of on_the_left_of",
        "to_the_right_of on_the_right_of",
        "in inside into",
        "over above",
        "toward towards",
        "hydrant fire_hydrant",
        "plate tray",
        "bowl pot",
    )
)

#: Adjectives that are not attributes of what is seen (quantifiers, comparatives of identity).
ADJ_STOPLIST: frozenset[str] = frozenset(
    [
        "other",
        "another",
        "such",
        "same",
        "several",
        "many",
        "few",
        "much",
        "more",
        "most",
        "own",
        "only",
        "certain",
        "each",
        "next",
        "last",
        "first",
        "second",
        "third",
        "front",
        "top",
        "back",
    ]
)
