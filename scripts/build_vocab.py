#!/usr/bin/env python3
"""Build the curated list of concrete, *visual* English nouns shipped with lavise-cli.

The list is the candidate vocabulary LaViSE uses to name CNN filters: words one
can point at in a photo (objects, animals, food, plants, scene parts, materials,
body parts, clothing, vehicles, furniture, visible natural phenomena such as
rain/snow/fire/smoke, and a few everyday person words).

Inputs
------
* WordNet 3.0 database files (``index.noun``, ``data.noun``, ``noun.exc``,
  ``cntlist.rev``)
  as installed by Debian's ``wordnet-base`` package (``/usr/share/wordnet``).
* A GloVe text file (optionally gzipped) whose lines are in frequency order:
  line *i* holds the word of frequency rank *i* (1-based).

Method
------
For every GloVe word of rank <= ``--max-rank`` (in rank order):

1. Drop it if it is in ``DENY`` or is not ``[a-z]{3,}`` (lowercase a-z only,
   length >= 3; so multi-word WordNet lemmas are never produced).
2. Keep it unconditionally if it is in ``PERSON_ALLOW`` (everyday person words,
   whose WordNet sense is noun.person or noun.group) or ``VISUAL_ALLOW`` (visible
   things rejected by the automatic rules below, e.g. "watch", "cloud").
3. Otherwise drop it if it is not a lemma in ``index.noun`` or if it is the
   plural of another noun lemma (WordNet "morphy" suffix rules and
   ``noun.exc``: "players", "stocks", "remains" -> dropped; singular forms are
   kept). Take its FIRST (most frequent) noun sense ``s`` and keep the word
   only if all of these hold:

   a. the word is written in lowercase among the lemmas of ``s``: this drops
      proper nouns (countries, cities, people, brands) and instance synsets
      (``@i``) such as Paris, except the few instances that WordNet also
      spells in lowercase (sun, moon, earth, isle);
   b. the lexicographer file of ``s`` is in ``KEEP_LEXFILES`` (noun.animal,
      noun.artifact, noun.body, noun.food, noun.object, noun.plant,
      noun.substance, noun.location, noun.phenomenon, noun.shape);
   c. ``s`` is a hyponym of physical_entity.n.01 (transitively, via ``@`` and
      ``@i`` pointers), which excludes abstraction.n.06 and everything below it
      (psychological_feature, communication, group, ...). noun.shape synsets
      live under abstraction in WordNet, so for them this test is skipped;
      a word must then be listed in ``SHAPE_ALLOW`` (only a handful of shapes
      are commonly named in images);
   d. if ``s`` is in noun.phenomenon it must also lie under
      natural_phenomenon.n.01 or physical_phenomenon.n.01, *and* the word must
      be in ``PHENOMENON_ALLOW`` (most physical phenomena -- gravity,
      radiation, energy -- are not visible);
   e. the word is used mainly as a noun: using the SemCor sense-tag counts in
      ``cntlist.rev``, the word is dropped if the counts summed over its
      verb/adjective/adverb senses are >= ``POS_MIN_COUNT`` and exceed
      ``POS_RATIO`` times the counts of its noun senses (drops "back", "can",
      "close", "well", "small", ...; words with few tag counts pass).
4. Write the surviving words, one per line, in GloVe rank order, after a
   ``#`` comment header (source, WordNet licence notice, command, count).

``DENY`` was curated by eyeballing the output: words whose first WordNet sense
is physical but which are mostly abstract, legal, political, financial or
proper names in modern (news/Wikipedia) usage, e.g. "state", "share", "order",
"security", "record", "charge", "capital", "court", "bush". The output is fully
deterministic: it depends only on the input files and ``--max-rank``.

Usage
-----
    python scripts/build_vocab.py --wordnet-dir /usr/share/wordnet \\
        --glove ../shared/data/glove/glove.6B.50d.top100k.txt.gz \\
        --out src/lavise_cli/resources/visual_nouns.txt

Only the Python standard library is used.
"""

from __future__ import annotations

import argparse
import gzip
import re
import sys
from pathlib import Path

# Standard WordNet lexicographer file numbers (the ``lexnames`` file; Debian's
# wordnet-base does not ship it, so the noun part of the table is inlined).
LEXNAMES = {
    3: "noun.Tops", 4: "noun.act", 5: "noun.animal", 6: "noun.artifact",
    7: "noun.attribute", 8: "noun.body", 9: "noun.cognition",
    10: "noun.communication", 11: "noun.event", 12: "noun.feeling",
    13: "noun.food", 14: "noun.group", 15: "noun.location", 16: "noun.motive",
    17: "noun.object", 18: "noun.person", 19: "noun.phenomenon",
    20: "noun.plant", 21: "noun.possession", 22: "noun.process",
    23: "noun.quantity", 24: "noun.relation", 25: "noun.shape",
    26: "noun.state", 27: "noun.substance", 28: "noun.time",
}

KEEP_LEXFILES = {
    "noun.animal", "noun.artifact", "noun.body", "noun.food", "noun.object",
    "noun.plant", "noun.substance", "noun.location", "noun.phenomenon",
    "noun.shape",
}

# A word is dropped as "mainly not a noun" when the SemCor tag counts of its
# verb/adjective/adverb senses are >= POS_MIN_COUNT and > POS_RATIO x the
# counts of its noun senses.
POS_RATIO = 2.0
POS_MIN_COUNT = 10

# Everyday person words one sees in photos (noun.person / noun.group in WordNet).
PERSON_ALLOW = {
    "man", "woman", "men", "women", "people", "person", "child", "children",
    "kid", "boy", "girl", "baby", "toddler", "adult",
    "teenager", "player", "rider", "skier", "surfer",
    "skateboarder", "snowboarder", "cyclist", "biker", "swimmer", "runner",
    "driver", "pedestrian", "passenger", "crowd", "audience", "spectator",
    "family", "couple", "bride", "groom", "chef", "cook", "waiter",
    "waitress", "soldier", "police", "policeman", "officer",
    "firefighter", "worker", "farmer", "fisherman", "student",
    "teacher", "athlete", "team", "tourist",
    "dancer", "musician", "guitarist", "drummer", "singer", "pilot",
    "sailor", "doctor", "nurse", "clown", "cowboy", "gentleman", "lady",
    "guy", "mother", "father", "friend",
}

# Visible things rejected by the automatic rules (e.g. a verb sense dominates
# SemCor, or the first sense is not physical) that should still be listed.
VISUAL_ALLOW = {
    # a verb/adjective sense dominates SemCor, but the object is common in photos
    "watch", "fly", "ring", "duck", "bear", "sink", "desert", "paint", "sail",
    "glue", "whip", "lock", "handle", "dress", "drink", "smile",
    # plural-only words (otherwise dropped as plurals)
    "pants", "glasses", "sunglasses", "shorts", "jeans", "trousers",
    "stairs", "fries", "graffiti",
    # the first WordNet sense is abstract (communication, group, person,
    # event, time, ...) but a later sense is a common visible thing
    "cloud", "light", "shadow", "ice", "plate", "lamp", "fence", "table",
    "book", "television", "radio", "newspaper", "magazine", "poster", "sign",
    "forest", "church", "village", "food", "fire", "flame", "wave", "rainbow",
    "sunset", "sunrise", "branch", "traffic", "railway", "column", "pillar",
    "dome", "tiger", "whale", "burger", "van", "monitor", "kite", "mug",
    "microwave", "gold", "avenue", "path", "soil", "arena", "diamond", "belt",
    "battery", "subway", "crop", "cinema", "portrait", "reservoir", "grove",
    "galaxy", "trailer", "wilderness", "fossil", "teaspoon", "brush",
    "outfit", "plantation", "coral", "shrimp", "torpedo", "vegetation",
    "sphere", "fin", "bolt", "notebook", "pharmacy", "arrow", "skeleton",
    "puzzle", "beacon", "gymnasium", "foam", "printer", "picnic", "quarry",
    "camouflage", "screw", "tattoo", "knot", "caravan", "thorn", "pedal",
    "bunny", "perfume", "donkey", "lettuce", "stew", "scanner", "emu",
    "zeppelin", "chopper", "mummy", "taco", "fig", "tart", "icing", "mixer",
    "folder", "yarn", "piston", "wasp", "carousel", "scorpion", "calculator",
    "rake", "heron", "embroidery", "levee", "cub", "trawler", "funnel",
    "tutu", "vat", "fang", "diner", "crown", "cable", "chain", "drawing",
    "yard", "villa", "cream", "clinic", "plume", "javelin", "prism",
}

# noun.phenomenon words that are visible in an image.
PHENOMENON_ALLOW = {
    "rain", "snow", "fire", "smoke", "wave", "lightning", "flame", "fog",
    "mist", "storm", "thunderstorm", "rainbow", "sunlight", "sunshine",
    "sunset", "sunrise", "tornado", "hurricane", "flood", "blizzard", "hail",
    "frost", "dew", "spray", "steam", "tide", "surf",
    "ripple", "splash", "glare", "reflection", "shade", "dust", "haze",
    "cloud", "avalanche", "eruption", "drizzle", "shower",
    "snowfall", "rainfall", "daylight", "moonlight", "starlight", "shadow",
    "spark", "explosion", "blast", "flash", "glow", "current",
    "whirlpool", "waterfall", "icicle", "snowflake", "raindrop", "bubble",
    "foam", "puddle",
}

# noun.shape words that name something one can see.
SHAPE_ALLOW = {
    "circle", "square", "triangle", "rectangle", "sphere", "cube", "cone",
    "cylinder", "pyramid", "star", "spiral", "arch", "ring", "loop", "curve",
    "stripe", "dot", "oval", "hexagon", "knot", "crescent",
    "zigzag", "grid", "polygon", "diamond", "cross", "heart", "tube", "spike",
    "bulge", "hollow", "groove", "ridge", "wedge", "disk", "disc", "coil",
    "helix", "column", "bump", "crease", "wrinkle", "fold", "notch", "dent",
}

# Known bad outputs, curated by eyeballing the generated list. Mostly words
# whose first WordNet sense is physical but whose modern (news/Wikipedia,
# i.e. GloVe) usage is abstract, legal, political, financial, a proper name, a
# function word or another part of speech -- or physical things that cannot
# be seen (chemicals, drugs, micro-organisms, hormones).
DENY = set("""
defendant innocent circumstances dateline sierra

state world end top bank area place center centre region district county
side site province post front middle position border territory zone scene
seat setting spot direction edge bottom neighborhood neighbourhood
municipality empire mainland origin residence commonwealth homeland landmark
venue tip habitat destination hell heaven hometown frontier diocese
archdiocese borough refuge boundary commune enclave midst hemisphere
paradise reservation outline exterior interior midfield whereabouts vicinity
desktop birthplace upside outpost crest watershed locality epicenter
latitude longitude heartland tract forefront midway prefecture duchy
battleground precinct subdivision motherland metropolis emirate confluence
shire itinerary barren hideout apex foothold principality bourne tack
stopover panhandle underside protectorate inferno equator demarcation
sultanate vantage uptown bedside zenith barrio borderline midpoint burg
zodiac wasteland home township resort clearing continent universe cosmos
orbit aerospace airspace haunt den gulf seaboard subcontinent

current round release opening track net addition joint royal web source
material felt fell must assembly housing product agent structure
block facing cell solution strip crude piece export facility output stuff
radical trend counter stable landing covering suspension chip import
implement rape terminal shed sole explosive graphic portfolio sub hanging
volatile starter stern haven holder segment hardware stopping hub load cope
fake innovation pharmaceutical mini steep upgrade casting commodity bolster
filling compact shook nova downhill leak aggregate cure midway stole idol
dressing flagship generic variable vintage lighter fraction portable
interface gateway shipment dose transplant fallout pad conglomerate
acoustic prop trump outlet archive lining junk slate sour hormone packing
remake buffer regulator poker graft blockbuster builder anime shooter pave
synthetic crisp loading seizing portal modeling preventive cleaner staple
ingredient constituent warmer downer cache aquatic setup obstruction thwart
precursor dynamo receptor botanical pullback upright mend lat therapeutic
cyberspace gig telex curbing landfall equatorial counterfeit lagging
undercut pee chilly commemorative privy pathway repertory flamboyant
standby annex duplicate bracing eats coping trapping sham binary grinding
slack equalizer equaliser disposable adamant cheat springboard stainless
optic peripheral override windfall sacking horseback ware amino cordial
formulation forgery kosher edible rotary overlapping gearing feeder
conserve thinner fore biennial perennial ornamental infusion anterior
posterior payload gunpoint thrift armament coating motif accessory
pinnacle climber frontal piling instrumentation calculus outpouring
magnum particulate kernel bender accelerator implant wonderland taping
placebo adjunct bittersweet solvent radial discard reset traverse voodoo
substrate fluorescent spawn manifold duplication corrective tidy plummet
bonanza requisite pontifical firebrand elastic shortening simulator
improvisation shoddy digestive modernism catchment grotesque brainchild
inhibitor scraping flimsy smoother tonic humankind steeper coax ticker
drier converter depository montage troika nuke lash brittle overload
contraband interceptor conduit plush cavity fragment tangle abyss shallow
scrap rift ascent uphill variable commuter retreat art system internet
panel transport transportation chamber arsenal architecture footage
soundtrack covering layer exit trigger lobby liquid mixture receiver
interstate curb auto airline airbus cricket fan lap circuit derby asylum
mine surface spoke holy embassy continent greenhouse masterpiece lodging
cosmetic siding ordnance backstage metallic knit weave wildcat dope
coloring handball fencing nude cameo edging aperture sportswear
commemorative hardcover livery scuba tore orbiter cosmetic sticker
evergreen canine facial abdominal equatorial mammoth bovine husky
world outdoors

bush john mike ben maria benjamin billy max marc murphy silva chad cole
brad mart till arroyo rouge costa manila afghan argentine mac jimmy robin
brent dell dale glen timothy kohl kirk tung newt das mayo stein clarence
garner hank rudd mack kraft cisco tripoli blanc ling cote derrick slater
molly hoya benny patten fitch serge toby col greenwood baba firestone napa
android nickelodeon spiegel veronica springer duff tam mei jasper bur
pinto aba columbine stifle grange anil hazel ridley tun fife burr tuck
dahl mum rowan reeve malacca panzer dobson babbitt milo horst samba hind
mina ness senna shay bantam tor tammy woodruff bot emery croft kat rook
lac dickey clegg medic marge dun scuttle hoy carrefour bethel ala roux
goldstone coney marguerite gage argent brill newmarket pique sable lancet
farina merle coulter argyle mull stipe pia shiv minster pate brig reed
hull coca holly heather iris violet daphne laurel mandarin fuji kiwi
bluegrass muscat cayman colt sow turkey queen giant female male marcel
imperial mesa butte laguna loch cirque wadi tit ass cum penis fanny
rose sang weld cheat erica cod flint gin

drug cocaine heroin vaccine medication antibiotic steroid antidote
methamphetamine narcotic morphine opium hashish aspirin poison venom
virus bacteria bacterium salmonella toxin enzyme protein cholesterol
hormone insulin estrogen testosterone dopamine adrenaline antibody
chromosome nucleus cortex plasma serum semen urine atrium fetus embryo
uranium carbon hydrogen oxygen nitrogen dioxide monoxide silicon sodium
plutonium vitamin ion electron proton neutron molecule atom particle
isotope polymer carbohydrate phosphate lithium helium caffeine ammonia
ammonium cyanide nitrate dioxin iodine methane potassium magnesium
phosphorus arsenic chlorine chloride palladium sarin catalyst ozone
mercury cobalt sulfur nicotine glucose melamine ethanol propane
semiconductor petrochemical oxide acid waste diet dietary herbal ration
stout brew hash saute
headquarters remains key route transit stronghold spill tee gauge tissue
nerve chess workplace forge bypass terminus heath hollow hurdle fixture
partition rigging freshwater foil topping exhaust wrapping brace garrison
consulate telegraph bullpen billboard makeup concrete hedge workshop jam
colour color backdrop helm rein gong barometer fax membrane notch stray
mankind gut hamstring ligament prostate colon groin sperm asbestos zinc
calcium
bin jean chuck lance buck dug butt vale teddy slug berg kris weir
macintosh sol dirk roe patty sap
loo mitt pew rue fishery paisley xerox roach stigma cozy dolly pollard
goo hamper scourge moderator grapple coupling milling mash additive beltway
ethernet biomass saline newsprint foodstuff casing uterus womb thyroid
gland bladder cartilage tendon marrow palate repository residue skid hopper
fuse parasite linden detour grit bongo floppy rump coco sonar hospice
pesticide bluff adobe rafter harness marquee splinter snapshot stalk
""".split())


def open_text(path: Path):
    if str(path).endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def read_glove_words(path: Path, max_rank: int) -> list[str]:
    """First ``max_rank`` words of a GloVe text file, in file (= rank) order."""
    words = []
    with open_text(path) as f:
        for line in f:
            if len(words) >= max_rank:
                break
            words.append(line.split(" ", 1)[0])
    return words


def read_data_noun(path: Path) -> dict[int, dict]:
    """offset -> {lexfile, words, hypernyms} from data.noun."""
    synsets = {}
    with open(path, "r", encoding="latin-1") as f:
        for line in f:
            if line.startswith(" "):  # licence header
                continue
            fields = line.split(" | ", 1)[0].split()
            offset, lexnum = int(fields[0]), int(fields[1])
            w_cnt = int(fields[3], 16)
            words = fields[4:4 + 2 * w_cnt:2]
            i = 4 + 2 * w_cnt
            p_cnt = int(fields[i])
            hypernyms = []
            for j in range(p_cnt):
                sym, target, pos = fields[i + 1 + 4 * j: i + 4 + 4 * j]
                if sym in ("@", "@i") and pos == "n":  # (instance) hypernym
                    hypernyms.append(int(target))
            synsets[offset] = {
                "lexfile": LEXNAMES.get(lexnum, str(lexnum)),
                "words": words,
                "hypernyms": hypernyms,
            }
    return synsets


def read_index_noun(path: Path) -> dict[str, list[int]]:
    """lemma -> synset offsets, most frequent sense first, from index.noun."""
    index = {}
    with open(path, "r", encoding="latin-1") as f:
        for line in f:
            if line.startswith(" "):
                continue
            fields = line.split()
            lemma, synset_cnt, p_cnt = fields[0], int(fields[2]), int(fields[3])
            start = 4 + p_cnt + 2  # skip pointer symbols, sense_cnt, tagsense_cnt
            index[lemma] = [int(x) for x in fields[start:start + synset_cnt]]
    return index


def read_pos_counts(path: Path) -> dict[str, list[int]]:
    """lemma -> [noun tag count, non-noun tag count] from cntlist.rev."""
    counts: dict[str, list[int]] = {}
    with open(path, "r", encoding="latin-1") as f:
        for line in f:
            sense_key, _sense_number, tag_cnt = line.split()
            lemma, rest = sense_key.split("%", 1)
            c = counts.setdefault(lemma.lower(), [0, 0])
            c[0 if rest[0] == "1" else 1] += int(tag_cnt)
    return counts


# WordNet's "morphy" detachment rules for nouns (inflected suffix -> base).
NOUN_SUFFIXES = [("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"),
                 ("ches", "ch"), ("shes", "sh"), ("men", "man"), ("ies", "y")]


def read_noun_exc(path: Path) -> dict[str, list[str]]:
    """inflected form -> base forms, from noun.exc (irregular plurals)."""
    exc: dict[str, list[str]] = {}
    with open(path, "r", encoding="latin-1") as f:
        for line in f:
            inflected, *bases = line.split()
            exc[inflected] = bases
    return exc


def is_plural(word: str, index: dict, exc: dict) -> bool:
    """True if ``word`` looks like the plural of another (>= 3 letter) noun lemma."""
    bases = list(exc.get(word, []))
    bases += [word[: -len(suf)] + rep
              for suf, rep in NOUN_SUFFIXES if word.endswith(suf)]
    return any(b != word and len(b) >= 3 and b in index for b in bases)


def ancestors(offset: int, synsets: dict[int, dict], memo: dict) -> frozenset:
    """All transitive (instance-)hypernyms of a synset, including itself."""
    if offset not in memo:
        result = {offset}
        for parent in synsets[offset]["hypernyms"]:
            result |= ancestors(parent, synsets, memo)
        memo[offset] = frozenset(result)
    return memo[offset]


def build(wordnet_dir: Path, glove: Path, max_rank: int) -> list[str]:
    synsets = read_data_noun(wordnet_dir / "data.noun")
    index = read_index_noun(wordnet_dir / "index.noun")
    pos_counts = read_pos_counts(wordnet_dir / "cntlist.rev")
    noun_exc = read_noun_exc(wordnet_dir / "noun.exc")
    physical = index["physical_entity"][0]
    visible_phenomena = {index["natural_phenomenon"][0],
                         index["physical_phenomenon"][0]}
    memo: dict = {}

    def keep(word: str) -> bool:
        if word in DENY or not re.fullmatch(r"[a-z]{3,}", word):
            return False
        if word in PERSON_ALLOW or word in VISUAL_ALLOW:
            return True
        if word not in index or is_plural(word, index, noun_exc):
            return False
        first = synsets[index[word][0]]
        # Proper nouns and instances (@i): the word must be written in
        # lowercase among the first sense's lemmas ("Paris" is dropped,
        # "Moon"/"moon" is kept).
        if word not in first["words"]:
            return False
        lexfile = first["lexfile"]
        if lexfile not in KEEP_LEXFILES:
            return False
        if lexfile == "noun.shape":
            return word in SHAPE_ALLOW
        up = ancestors(index[word][0], synsets, memo)
        if physical not in up:
            return False
        if lexfile == "noun.phenomenon":
            if not (up & visible_phenomena) or word not in PHENOMENON_ALLOW:
                return False
        noun_cnt, other_cnt = pos_counts.get(word, (0, 0))
        if other_cnt >= POS_MIN_COUNT and other_cnt > POS_RATIO * noun_cnt:
            return False
        return True

    seen, out = set(), []
    for word in read_glove_words(glove, max_rank):
        if word not in seen and keep(word):
            seen.add(word)
            out.append(word)
    return out


WORDNET_LICENSE = """\
WordNet Release 3.0 This software and database is being provided to you, the
LICENSEE, by Princeton University under the following license. By obtaining,
using and/or copying this software and database, you agree that you have read,
understood, and will comply with these terms and conditions.: Permission to
use, copy, modify and distribute this software and database and its
documentation for any purpose and without fee or royalty is hereby granted,
provided that you agree to comply with the following copyright notice and
statements, including the disclaimer, and that the same appear on ALL copies
of the software, database and documentation, including modifications that you
make for internal use or for distribution. WordNet 3.0 Copyright 2006 by
Princeton University. All rights reserved. THIS SOFTWARE AND DATABASE IS
PROVIDED "AS IS" AND PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR
WARRANTIES, EXPRESS OR IMPLIED. BY WAY OF EXAMPLE, BUT NOT LIMITATION,
PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES OF MERCHANT-
ABILITY OR FITNESS FOR ANY PARTICULAR PURPOSE OR THAT THE USE OF THE LICENSED
SOFTWARE, DATABASE OR DOCUMENTATION WILL NOT INFRINGE ANY THIRD PARTY PATENTS,
COPYRIGHTS, TRADEMARKS OR OTHER RIGHTS. The name of Princeton University or
Princeton may not be used in advertising or publicity pertaining to
distribution of the software and/or database. Title to copyright in this
software, database and any associated documentation shall at all times remain
with Princeton University and LICENSEE agrees to preserve same."""


def render(words: list[str], glove: Path, max_rank: int) -> str:
    header = [
        "lavise-cli visual noun vocabulary: concrete, visible English nouns.",
        "One word per line, ordered by GloVe frequency rank.",
        "Source: WordNet 3.0 (Princeton University), database files from the",
        "Debian package wordnet-base; filtered against the GloVe 6B vocabulary.",
        "Generated by scripts/build_vocab.py (see its docstring for the method).",
        "Command:",
        "  python scripts/build_vocab.py --wordnet-dir /usr/share/wordnet \\",
        f"    --glove ../shared/data/glove/{glove.name} \\",
        f"    --max-rank {max_rank} --out src/lavise_cli/resources/visual_nouns.txt",
        f"Count: {len(words)}",
        "",
        "This list is derived from WordNet 3.0 and is distributed under the",
        "WordNet licence, reproduced here:",
        "",
        *WORDNET_LICENSE.splitlines(),
    ]
    lines = [("# " + h).rstrip() for h in header] + words
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"),
                   help="WordNet 3.0 dict directory (data.noun, index.noun, "
                        "noun.exc, cntlist.rev)")
    p.add_argument("--glove", type=Path, required=True,
                   help="GloVe text file (.txt or .txt.gz), lines in frequency order")
    p.add_argument("--out", type=Path, required=True, help="output text file")
    p.add_argument("--max-rank", type=int, default=30000,
                   help="keep only words within this GloVe frequency rank "
                        "(default 30000)")
    args = p.parse_args(argv)

    words = build(args.wordnet_dir, args.glove, args.max_rank)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8", newline="\n") as f:
        f.write(render(words, args.glove, args.max_rank))
    print(f"wrote {len(words)} words to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
