"""Anatomy and view named in free text: the keyword lists and the matcher the selection rules
use on ``StudyDescription``, ``SeriesDescription``, ``ProtocolName`` and the like.

Why free text at all: many real radiographs carry no ``BodyPartExamined``, or a wrong one
(a modality default, a vendor code), and the anatomy is only in the descriptions the
technologist or the RIS typed: "RX TORAX PA", "KNIE LINKS", "OPG", "Thorax p.a.". These
texts come from sites in many languages, so the default lists below cover English, German,
French, Spanish, Italian, Portuguese, Dutch, Nordic and a few other spellings, and the
matcher is:

* **word-bounded**: a keyword matches whole words only ("CHEST" does not match "CHESTER",
  "HAND" does not match "HANDGELENK": compounds that matter are listed themselves);
* **case- and accent-insensitive**: text and keywords are compared after Unicode
  decomposition without combining marks, upper-cased ("TÓRAX" = "TORAX", "Hüfte" = "HUFTE");
* **punctuation-blind**: every run of non-letters/digits is one space, so "L-SPINE",
  "L SPINE" and "l_spine" are the same words, and a keyword of several words ("RX TORAX",
  "KLATKA PIERSIOWA") matches those words in sequence.

The lists are defaults: the node's ``studies.selection`` settings replace any of them
(``config/node.yaml`` shows them in full).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

# Chest: what a frontal chest radiograph's descriptions say, in several languages.
CHEST_KEYWORDS: tuple[str, ...] = (
    "CHEST", "CXR", "LUNG", "LUNGS", "THORAX", "THORACIC CAGE",  # English / Latin
    "TORAX", "RX TORAX", "PECHO", "PULMON", "PULMONES",  # Spanish (TÓRAX, PULMÓN)
    "TORACE", "POLMONE", "POLMONI",  # Italian
    "POUMON", "POUMONS",  # French
    "LUNGE", "LUNGEN", "BRUSTKORB",  # German (THORAX above)
    "BORST", "LONGEN", "THORAKS", "BRYST", "LUNGOR", "LUNGER",  # Dutch, Nordic
    "PULMAO", "PULMOES",  # Portuguese (PULMÃO, TÓRAX above)
    "KLATKA PIERSIOWA", "KLATKI PIERSIOWEJ", "PLUCA", "PŁUCA",  # Polish (Ł has no accent)
    "AKCIGER", "GOGUS",  # Turkish (AKCİĞER, GÖĞÜS)
)

# Non-chest anatomy a CR/DX node receives: anatomy (as the reason names it) -> keywords.
NON_CHEST_KEYWORDS: dict[str, tuple[str, ...]] = {
    "hand": ("HAND", "HANDS", "FINGER", "FINGERS", "THUMB", "MAIN", "MAINS", "MANO", "MANOS",
             "MAO", "DAUMEN", "DOIGT", "DEDO", "DITO", "VINGER"),
    "wrist": ("WRIST", "HANDGELENK", "POIGNET", "MUNECA", "POLSO", "PUNHO", "POLS",
              "SCAPHOID", "SKAPHOID", "SCAPHOIDE"),
    "forearm": ("FOREARM", "UNTERARM", "AVANT BRAS", "ANTEBRAZO", "AVAMBRACCIO", "RADIUS",
                "ULNA"),
    "elbow": ("ELBOW", "ELLENBOGEN", "ELLBOGEN", "COUDE", "CODO", "GOMITO", "COTOVELO",
              "ELLEBOOG"),
    "humerus": ("HUMERUS", "OBERARM", "HUMERO", "OMERO"),
    "shoulder": ("SHOULDER", "SCHULTER", "EPAULE", "HOMBRO", "SPALLA", "OMBRO", "SCHOUDER",
                 "CLAVICLE", "CLAVICULA", "KLAVIKULA", "CLAVICULE", "SCAPULA", "AC JOINT"),
    "hip": ("HIP", "HIPS", "HUFTE", "HUEFTE", "HANCHE", "CADERA", "ANCA", "QUADRIL", "HEUP"),
    "pelvis": ("PELVIS", "BECKEN", "BASSIN", "PELVIS OSEA", "BACINO", "BACIA", "BEKKEN",
               "SACRUM", "ISG", "SI JOINT", "SI JOINTS"),
    "femur": ("FEMUR", "FEMORE", "OBERSCHENKEL", "THIGH", "CUISSE", "MUSLO"),
    "knee": ("KNEE", "KNEES", "KNIE", "KNIEGELENK", "GENOU", "GENOUX", "RODILLA",
             "GINOCCHIO", "JOELHO", "PATELLA", "ROTULA"),
    "lower leg": ("TIBIA", "FIBULA", "UNTERSCHENKEL", "LOWER LEG", "JAMBE", "PIERNA",
                  "GAMBA", "PERNA"),
    "ankle": ("ANKLE", "SPRUNGGELENK", "OSG", "CHEVILLE", "TOBILLO", "CAVIGLIA",
              "TORNOZELO", "ENKEL"),
    "foot": ("FOOT", "FEET", "TOE", "TOES", "CALCANEUS", "FUSS", "FUESSE", "VORFUSS", "PIED",
             "PIE", "PIEDE", "VOET", "ZEHE", "ZEHEN"),
    "spine": ("SPINE", "LSPINE", "CSPINE", "TSPINE", "SSPINE", "L SPINE", "C SPINE",
              "T SPINE", "LUMBAR", "LUMBAR SPINE", "THORACIC SPINE", "CERVICAL SPINE",
              "WIRBELSAULE", "WIRBELSAEULE", "LWS", "BWS", "HWS", "RACHIS", "COLUMNA",
              "COLONNA", "RACHIDE", "COLUNA", "WERVELKOLOM", "SCOLIOSIS", "SKOLIOSE",
              "SCOLIOSE", "ESCOLIOSIS", "COCCYX", "DENS"),
    "skull": ("SKULL", "HEAD", "SCHADEL", "SCHAEDEL", "CRANE", "CRANEO", "CRANIO",
              "SCHEDEL", "SINUS", "SINUSES", "NNH", "NASENNEBENHOHLEN", "FACIAL BONES",
              "ORBIT", "ORBITS", "MASTOID", "SELLA"),
    "dental": ("DENTAL", "TEETH", "TOOTH", "PANORAMIC", "PANORAMA", "PANO", "OPG", "OPT",
               "ORTHOPANTOMOGRAM", "ORTHOPANTOMOGRAMM", "CEPH", "CEPHALOMETRIC", "CEPHALOGRAM",
               "FERNROENTGEN", "FRS", "BITEWING", "PERIAPICAL", "ZAHN", "ZAHNE", "ZAEHNE",
               "KIEFER", "DENTAIRE", "PANORAMIQUE", "PANORAMICA", "DIENTES", "DENTI",
               "DENTES", "MANDIBLE", "MANDIBULA", "JAW", "TMJ"),
    "abdomen": ("ABDOMEN", "ABDOMINAL", "ABDO", "KUB", "BAUCH", "BUIK", "ADDOME",
                "ABDOME"),
    "breast": ("BREAST", "MAMMO", "MAMMOGRAPHY", "MAMMOGRAPHIE", "MAMMA", "SEIN", "MAMA"),
    "extremity": ("EXTREMITY", "EXTREMITAT", "EXTREMITE", "EXTREMIDAD", "LEG", "ARM"),
}

# Lateral views named in a description; frontal ones, so that a description naming both
# (a "PA + LAT" protocol shared by both images of the study) decides nothing.
LATERAL_KEYWORDS: tuple[str, ...] = (
    "LAT", "LATERAL", "LATERALE", "LATERAAL", "SEITLICH", "SEITL", "PROFIL", "PROFILE",
    "PERFIL", "LL", "RL",
)
FRONTAL_KEYWORDS: tuple[str, ...] = (
    "PA", "AP", "P A", "A P", "FRONTAL", "FRONTALE", "FACE", "DE FACE", "POSTEROANTERIOR",
    "ANTEROPOSTERIOR",
)

# ViewCodeSequence (DICOM CID 4010 "DX View") codes of a lateral projection, SNOMED CT with
# the legacy SNOMED-RT (SRT) value that older headers carry, and RadLex: code -> meaning.
LATERAL_VIEW_CODES: dict[str, str] = {
    "399067008": "lateral", "R-102CD": "lateral",
    "399198007": "right lateral", "R-10232": "right lateral",
    "399173006": "left lateral", "R-10236": "left lateral",
    "399352003": "lateral-medial", "R-10228": "lateral-medial",
    "399260004": "medial-lateral", "R-10224": "medial-lateral",
    "RID43591": "lateral view",
}

_SEPARATORS = re.compile(r"[\W_]+")


def normalise(text: str) -> str:
    """Upper-case words without accents, one space between them ("Tórax  p.a." ->
    "TORAX P A"): the form both a description and a keyword are compared in."""
    decomposed = unicodedata.normalize("NFKD", text.upper())
    plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    return _SEPARATORS.sub(" ", plain).strip()


class KeywordError(ValueError):
    """A configured keyword that has no letter or digit (it would match nothing)."""


@dataclass(frozen=True)
class KeywordSet:
    """Whole-word matching of one keyword list against free text."""

    pattern: re.Pattern[str] | None

    def matches(self, text: str) -> bool:
        return self.pattern is not None and self.pattern.search(f" {normalise(text)} ") is not None


@lru_cache(maxsize=64)
def keyword_set(keywords: tuple[str, ...]) -> KeywordSet:
    """A compiled matcher for ``keywords`` (cached: rules are applied per image)."""
    words = []
    for keyword in keywords:
        word = normalise(keyword)
        if not word:
            raise KeywordError(f"keyword {keyword!r} has no letter or digit")
        words.append(word)
    if not words:
        return KeywordSet(None)
    # longest first, so a multi-word keyword is tried before its first word
    alternatives = "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))
    return KeywordSet(re.compile(f" (?:{alternatives}) "))


def check_keywords(keywords: Iterable[str]) -> list[str]:
    """``keywords`` unchanged, or :class:`KeywordError` for one that would match nothing."""
    out = list(keywords)
    keyword_set(tuple(out))
    return out


def anatomy_named(text: str, anatomy: Mapping[str, tuple[str, ...]]) -> str | None:
    """The first anatomy (in ``anatomy``'s order) whose keywords ``text`` names, or None."""
    for name, keywords in anatomy.items():
        if keyword_set(keywords).matches(text):
            return name
    return None
