"""HTML -> text for stack-exchange questions and answers."""

from __future__ import annotations

import re
from html.parser import HTMLParser


class _HTMLToText(HTMLParser):
    """Block elements become paragraphs separated by a blank line; <pre> becomes a ``` fence with its
    text kept verbatim; inline <code> becomes `code`; <li> becomes '- item'; entities are decoded."""

    BLOCKS = {
        "p", "div", "blockquote", "ul", "ol", "table", "tr", "hr", "section", "article",
        "h1", "h2", "h3", "h4", "h5", "h6", "dl", "dt", "dd",
    }  # fmt: skip
    SKIP = {"script", "style"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks: list[tuple[str, bool]] = []  # (text, is a list item)
        self.current: list[str] = []
        self.in_li = False
        self.pre_depth = 0
        self.skip_depth = 0

    def flush(self) -> None:
        text = "".join(self.current)
        self.current = []
        if self.pre_depth:
            return
        lines = [re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in text.split("\n")]
        text = "\n".join(lines).strip()
        if text:
            self.blocks.append((text, self.in_li))
        self.in_li = False

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip_depth += 1
        elif tag == "pre":
            if not self.pre_depth:
                self.flush()
            self.pre_depth += 1
        elif self.pre_depth:
            pass  # <code> inside <pre>: the fence already marks it
        elif tag in self.BLOCKS:
            self.flush()
        elif tag == "li":
            self.flush()
            self.current.append("- ")
            self.in_li = True
        elif tag == "br":
            self.current.append("\n")
        elif tag == "code":
            self.current.append("`")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip_depth = max(0, self.skip_depth - 1)
        elif tag == "pre":
            if self.pre_depth:
                self.pre_depth -= 1
                if not self.pre_depth:
                    code = "".join(self.current).strip("\n")
                    self.current = []
                    if code.strip():
                        self.blocks.append(("```\n" + code + "\n```", False))
        elif self.pre_depth:
            pass
        elif tag in self.BLOCKS or tag == "li":
            self.flush()
        elif tag == "code":
            self.current.append("`")

    def handle_data(self, data):
        if self.skip_depth:
            return
        if not self.pre_depth:
            data = re.sub(r"\s+", " ", data)  # source newlines are not line breaks outside <pre>
        self.current.append(data)

    def text(self) -> str:
        self.close()
        if self.pre_depth:  # unclosed <pre>: keep its text
            self.pre_depth = 0
            code = "".join(self.current).strip("\n")
            self.current = []
            if code.strip():
                self.blocks.append(("```\n" + code + "\n```", False))
        self.flush()
        out = []
        for k, (text, is_li) in enumerate(self.blocks):
            if k:
                out.append("\n" if is_li and self.blocks[k - 1][1] else "\n\n")  # list items: one per line
            out.append(text)
        return "".join(out)


def html_to_text(html: str) -> str:
    """Stack-exchange HTML -> plain text with code kept (see _HTMLToText)."""
    parser = _HTMLToText()
    parser.feed(html)
    return parser.text()
