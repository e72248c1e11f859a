import pytest

from e5kit.prompts import (DEFAULT_TASK, TASK_INSTRUCTIONS, beir_document, format_text, format_texts,
                           task_instruction)


def test_e5_query_and_passage_prefixes():
    assert format_text("how are you", "query") == "query: how are you"
    assert format_text("how are you", "passage") == "passage: how are you"
    assert format_text("how are you", "raw") == "how are you"


def test_never_prefix_twice():
    assert format_text("query: x", "query") == "query: x"
    assert format_text("passage: x", "passage") == "passage: x"
    # a query that merely mentions the other prefix still gets its own
    assert format_text("passage: x", "query") == "query: passage: x"
    q = format_text("x", "query", "instruct", "SciFact")
    assert format_text(q, "query", "instruct", "SciFact") == q


def test_instruct_template_and_task_table():
    q = format_text("how much protein", "query", "instruct", "SciFact")
    assert q == f"Instruct: {TASK_INSTRUCTIONS['SciFact']}\nQuery: how much protein"
    assert format_text("doc", "passage", "instruct") == "doc"  # no prefix on documents
    assert task_instruction(None) == DEFAULT_TASK
    assert task_instruction("scifact") == TASK_INSTRUCTIONS["SciFact"]  # any case
    assert task_instruction("sick_r") == TASK_INSTRUCTIONS["SICK-R"]
    assert task_instruction("Find the answer") == "Find the answer"  # free text is the instruction


def test_style_none_and_errors():
    assert format_texts(["a", "b"], "query", "none") == ["a", "b"]
    with pytest.raises(ValueError, match="prompt style"):
        format_text("a", "query", "bogus")
    with pytest.raises(ValueError, match="input_type"):
        format_text("a", "document")
    with pytest.raises(TypeError):
        format_text(3, "query")


def test_beir_document():
    assert beir_document("Title", "Body") == "Title Body"
    assert beir_document("", "Body") == "Body"
    assert beir_document(None, "Body") == "Body"
