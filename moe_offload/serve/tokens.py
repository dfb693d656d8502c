"""The server's tokenization, the way `transformers.AutoTokenizer` does it for the model's files.

* Completion prompts (text): the tokenizer.json post-processor decides the BOS (and any other added
  token), as transformers 5's AutoTokenizer does for every tokenizer class: `add_bos_token` in
  tokenizer_config.json does not change it there, so it does not here. A tokenizer.json without a
  post-processor adds nothing. A GGUF file's vocabulary has no post-processor: its prompts get the
  family's BOS rule, as `generate` does (transformers' GGUF tokenizer adds Mixtral's BOS likewise).
  Special-token text in a completion prompt is the special token (as AutoTokenizer and vLLM encode it).
* Chat: the rendered template is encoded without an added BOS (the template writes its own, as
  `apply_chat_template` does), and special-token text that came from a message's *content* is encoded as
  plain text: a user typing `</s>` gets the characters, not the EOS token. Special tokens the template
  itself writes (`{{ bos_token }}`, `{{ eos_token }}`, role markers) stay special.
"""

from __future__ import annotations

import json

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from ..runtime import OffloadedModel

# Private-use characters marking where message content starts and ends in a rendered template.
OPEN, CLOSE = "\ue000", "\ue001"


class ServerTokenizer:
    def __init__(self, om: "OffloadedModel"):
        from tokenizers import Tokenizer

        self.om = om
        tok = om.tokenizer
        self.tok = tok
        self.family_bos = tok is not None and str(om.path).endswith(".gguf") and \
            json.loads(tok.to_str()).get("post_processor") is None
        if tok is not None:
            self.text_tok = Tokenizer.from_str(tok.to_str())
            self.text_tok.encode_special_tokens = True  # every special token's text encoded as text
            self.special = sorted((t.content for t in tok.get_added_tokens_decoder().values() if t.special),
                                  key=len, reverse=True)

    def encode_prompt(self, text: str) -> list[int]:
        """A completion prompt -> ids (see the module docstring for BOS)."""
        if self.tok is None or self.family_bos:
            return self.om.encode(text)  # raises the no-tokenizer error when there is none
        return self.tok.encode(text, add_special_tokens=True).ids

    def encode_chat(self, render: Callable[[Callable[[str], str]], str]) -> list[int]:
        """`render(wrap)` renders the template with every content string passed through `wrap`. Content
        special-token text is kept as text; falls back to a plain encode when the template changes the
        content (e.g. strips it) so that the markers do not survive intact."""
        plain = render(lambda s: s)
        marked = render(lambda s: OPEN + s.replace(OPEN, "").replace(CLOSE, "") + CLOSE)
        if self.tok is None:
            return self.om.encode(plain)
        if marked.replace(OPEN, "").replace(CLOSE, "") != plain or not _balanced(marked):
            return self.tok.encode(plain, add_special_tokens=False).ids
        ids: list[int] = []
        buf: list[str] = []  # text since the last template-written special token
        depth = 0
        i = 0
        while i < len(marked):
            ch = marked[i]
            if ch == OPEN:
                depth += 1
                i += 1
                continue
            if ch == CLOSE:
                depth -= 1
                i += 1
                continue
            if depth == 0:
                hit = next((s for s in self.special if marked.startswith(s, i)), None)
                if hit is not None:
                    ids += self._text("".join(buf))
                    buf = []
                    ids.append(self.tok.token_to_id(hit))
                    i += len(hit)
                    continue
            buf.append(ch)
            i += 1
        return ids + self._text("".join(buf))

    def _text(self, s: str) -> list[int]:
        return self.text_tok.encode(s, add_special_tokens=False).ids if s else []

    def token_text(self, tid: int) -> str:
        """One token's text for logprobs (special tokens by name)."""
        if self.tok is None:
            return str(tid)
        return self.tok.decode([tid], skip_special_tokens=False)


def _balanced(s: str) -> bool:
    depth = 0
    for ch in s:
        if ch == OPEN:
            depth += 1
        elif ch == CLOSE:
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


def wrap_contents(messages: list[dict[str, Any]], wrap: Callable[[str], str]) -> list[dict[str, Any]]:
    return [{**m, "content": wrap(m["content"])} if isinstance(m.get("content"), str) else m for m in messages]
