"""The free-text matcher: whole words, any case, accents and punctuation ignored, and the
default lists recognise what real descriptions say in several languages."""

from __future__ import annotations

import pytest

from ai.anatomy import (
    CHEST_KEYWORDS,
    NON_CHEST_KEYWORDS,
    KeywordError,
    anatomy_named,
    check_keywords,
    keyword_set,
    normalise,
)

CHEST = keyword_set(CHEST_KEYWORDS)


@pytest.mark.parametrize(("text", "expected"), [
    ("Tórax  p.a.", "TORAX P A"), ("l_spine", "L SPINE"), ("Hüfte", "HUFTE"),
    ("FUß", "FUSS"), ("AKCİĞER", "AKCIGER"), ("  ", ""),
])
def test_normalise(text: str, expected: str) -> None:
    assert normalise(text) == expected


@pytest.mark.parametrize("text", [
    "CHEST PA", "Thorax p.a.", "RX TÓRAX", "rx torax", "THORAKS", "POUMONS", "Lunge",
    "LUNG", "PULMÓN", "TORACE AP", "BORST", "PECHO", "CXR", "Radiographie pulmonaire POUMON",
])
def test_chest_words_match(text: str) -> None:
    assert CHEST.matches(text)


@pytest.mark.parametrize("text", [
    "CHESTER", "Manchester", "PNEUMOTHORAX", "THORACIC SPINE", "Lungenembolie", "", "No Finding",
])
def test_chest_is_a_whole_word(text: str) -> None:
    assert not CHEST.matches(text)


@pytest.mark.parametrize(("text", "anatomy"), [
    ("KNIE LINKS", "knee"), ("Genou droit", "knee"), ("L-SPINE AP", "spine"),
    ("LWS in 2 Ebenen", "spine"), ("OPG", "dental"), ("Panoramique dentaire", "dental"),
    ("HAND PA", "hand"), ("Handgelenk re.", "wrist"), ("Muñeca", "wrist"),
    ("Épaule gauche", "shoulder"), ("Hüfte links", "hip"), ("Bassin", "pelvis"),
    ("Schädel", "skull"), ("ABDOMEN LEER", "abdomen"), ("Sprunggelenk", "ankle"),
    ("Pied", "foot"), ("Ellbogen", "elbow"), ("Femur", "femur"), ("THORACIC SPINE", "spine"),
])
def test_non_chest_anatomy_is_named(text: str, anatomy: str) -> None:
    assert anatomy_named(text, NON_CHEST_KEYWORDS) == anatomy


@pytest.mark.parametrize("text", [
    # NIH ChestX-ray14 labels travel in StudyDescription: none may read as anatomy
    "No Finding", "Atelectasis|Cardiomegaly|Effusion", "Infiltration|Mass|Nodule",
    "Pneumonia|Pneumothorax", "Consolidation|Edema|Emphysema|Fibrosis",
    "Pleural_Thickening|Hernia", "CHEST PA", "THORAX AP liegend", "Handover", "SHANDY",
])
def test_chest_and_label_texts_name_no_other_anatomy(text: str) -> None:
    assert anatomy_named(text, NON_CHEST_KEYWORDS) is None


def test_a_keyword_without_letters_is_refused() -> None:
    with pytest.raises(KeywordError, match="no letter or digit"):
        check_keywords(["CHEST", " - "])
    assert not keyword_set(()).matches("CHEST")
