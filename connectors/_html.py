"""HTML to readable text with a real parser: headings, lists and tables keep their shape."""

from __future__ import annotations

from bs4 import BeautifulSoup

BLOCKS = ("p", "div", "section", "article", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "table")
DROP = ("script", "style", "noscript", "head", "template", "svg")


def html_to_text(html: str, drop: tuple[str, ...] = ()) -> str:
    """Plain text with a blank line between blocks; `drop` names more tags to remove whole (macros)."""
    soup = BeautifulSoup(html, "html.parser")
    for tag in soup.find_all([*DROP, *drop]):
        tag.decompose()
    for item in soup.find_all("li"):
        item.insert(0, "- ")
    for cell in soup.find_all(["td", "th"]):
        cell.append(" | ")
    for heading in soup.find_all(["h1", "h2", "h3", "h4", "h5", "h6"]):
        heading.insert(0, "#" * int(heading.name[1]) + " ")
    for block in soup.find_all(BLOCKS):
        block.insert_before("\n\n")
        block.insert_after("\n\n")
    lines = [" ".join(line.split()) for line in soup.get_text().splitlines()]
    text = "\n".join(lines)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.strip()
