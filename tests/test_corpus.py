import json
import re
from dataclasses import replace

import pytest

from decomposer.data import build_corpus, iter_documents, load_manifest
from decomposer.data.corpus import corpus_paths, split_of
from decomposer.data.extract import Document, detokenise_brown
from decomposer.data.sources import SOURCES, fetch
from decomposer.data.wikitext import strip_wikitext
from decomposer.errors import VpdError
from tests.conftest import write_fixture_sources


def test_every_source_is_pinned_with_a_sha256_and_licence():
    assert {s.name for s in SOURCES} == {"sotu", "moby_dick", "brown", "gensim", "fortunes"}
    for s in SOURCES:
        assert re.fullmatch("[0-9a-f]{64}", s.sha256), s.name
        assert s.version in s.path.replace("%3a", ":") or s.version.split(":")[-1] in s.path
        assert s.licence


def test_detokenise_brown_strips_tags_and_fixes_spacing():
    assert detokenise_brown("The/at jury/nn said/vbd ``/`` no/at ''/'' ./.") == 'The jury said "no".'
    assert detokenise_brown("It/pps did/dod n't/* ,/, it/pps 's/bez over/rb ./.") == "It didn't, it's over."
    assert detokenise_brown("(/( 1897/cd )/) ;/. ;/.") == "(1897);"


def test_strip_wikitext_keeps_prose_and_drops_markup():
    raw = (
        "'''Anarchism''' is a [[political philosophy|philosophy]].&lt;ref&gt;x&lt;/ref&gt; {{Box|a={{b}}}}Ok."
        "\n==History==\n* a list item"
    )
    assert strip_wikitext(raw) == "Anarchism is a philosophy. Ok.\nHistory"


def test_build_corpus_from_fixture_sources(micro_data_dir):
    manifest = load_manifest(micro_data_dir)
    counts = manifest["counts"]
    # Every source contributes; the redirect page, ASCII art and the index files do not.
    assert {"sotu", "moby_dick", "brown", "gensim_news", "gensim_wiki", "fortunes"} <= set(counts)
    docs = list(iter_documents("train", micro_data_dir)) + list(iter_documents("heldout", micro_data_dir))
    by_source = {}
    for d in docs:
        by_source.setdefault(d.source, []).append(d)
    assert len(by_source["sotu"]) == 6 and len(by_source["moby_dick"]) == 5 and len(by_source["brown"]) == 6
    assert len(by_source["gensim_news"]) == 4 and len(by_source["gensim_wiki"]) == 1
    assert [d.doc_id for d in by_source["fortunes"]] == ["men-women_000"]
    assert by_source["fortunes"][0].text == (
        "A bachelor is a man who never made the same mistake once.\n\nHe who laughs last thinks slowest."
    )
    assert by_source["brown"][0].text == "The jury said \"no evidence\" was found.\n\nIt didn't say so, and it's over."
    wiki = by_source["gensim_wiki"][0].text
    assert wiki.startswith("Anarchism\n\nAnarchism is a philosophy that rejects rulers.") and "{{" not in wiki
    # The supplement is about half of all words, as requested.
    words = {s: sum(c[split].get("words", 0) for split in ("train", "heldout")) for s, c in counts.items()}
    supplement = sum(v for s, v in words.items() if s.startswith("supplement_"))
    assert 0.45 < supplement / sum(words.values()) < 0.6
    # Per-source token counts add up to the totals.
    for split in ("train", "heldout"):
        assert manifest["totals"][split]["tokens"] == sum(c[split].get("tokens", 0) for c in counts.values())
    assert manifest["totals"]["heldout"]["documents"] > 0


def test_split_is_deterministic_and_independent_of_other_documents():
    doc = Document("sotu", "1790_george_washington_n", "text")
    assert split_of(doc, 0.3, seed=0) == split_of(doc, 0.3, seed=0)
    docs = [Document("s", str(i), "") for i in range(4000)]
    share = sum(split_of(d, 0.1, seed=0) == "heldout" for d in docs) / len(docs)
    assert 0.08 < share < 0.12


def test_rebuild_is_byte_identical(micro_data_dir, tmp_path):
    sources = write_fixture_sources(tmp_path / "sources")
    build_corpus(tmp_path, sources=sources, vocab_size=400, heldout_fraction=0.2, supplement_fraction=0.5, seed=0)
    for name in ("train.jsonl", "heldout.jsonl", "tokenizer/tokenizer.json"):
        assert (corpus_paths(tmp_path).root / name).read_bytes() == (
            corpus_paths(micro_data_dir).root / name
        ).read_bytes()


def test_sha256_mismatch_is_refused_and_keeps_nothing(tmp_path):
    sources = write_fixture_sources(tmp_path / "sources")
    bad = replace(sources[0], sha256="0" * 64, path="x/nowhere.tgz")
    (tmp_path / "sources" / bad.filename).write_bytes(b"tampered")
    # The cached file is wrong and no registry answers on this port: one clear sentence.
    import os

    os.environ["VPD_NPM_REGISTRY"] = "http://127.0.0.1:9"
    try:
        with pytest.raises(VpdError, match="Could not download corpus source `sotu`"):
            fetch(bad, tmp_path / "sources", timeout=5)
    finally:
        del os.environ["VPD_NPM_REGISTRY"]


def test_load_manifest_refuses_other_format_versions(micro_data_dir, tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    manifest = json.loads((corpus_paths(micro_data_dir).manifest).read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(VpdError, match="version 99, but this release reads"):
        load_manifest(tmp_path)


def test_missing_corpus_names_the_command(tmp_path):
    with pytest.raises(VpdError, match="vpd corpus build"):
        load_manifest(tmp_path)
