"""PromptBuilder (rag_grpc/generate/prompt.py) with the embedding model's
tokenizer: passages cut to the token budget at a token boundary, and the
token count summed from the parts."""

from __future__ import annotations

from tokenizers import Tokenizer

from rag_grpc.generate.base import Passage
from rag_grpc.generate.prompt import PromptBuilder
from tests.conftest import CORPUS, MODEL_DIR


def test_prompt_context_is_cut_to_the_token_budget_at_a_token_boundary() -> None:
    tokenizer_path = MODEL_DIR / "tokenizer.json"
    builder = PromptBuilder(tokenizer_path, "{context}\nQ: {question}", budget=40)
    passages = [Passage("a", "a#0", CORPUS[0].text), Passage("b", "b#0", CORPUS[1].text)]
    prompt, used, counted = builder.build("What is a volcano?", passages)
    context = prompt.split("\nQ: ")[0]
    assert used == 1 and context.startswith("[1] A volcano")
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    body = context[len("[1] ") :]
    ids = tokenizer.encode(body, add_special_tokens=False).ids
    full = tokenizer.encode(CORPUS[0].text, add_special_tokens=False).ids
    assert len(ids) == 40 and ids == full[:40]  # whole tokens only, a prefix of the passage
    # The count summed from the parts equals tokenising the whole prompt.
    assert counted == builder.count(prompt)
    again = builder.build("What is a volcano?", passages)  # from the encoding cache
    assert again == (prompt, used, counted)
