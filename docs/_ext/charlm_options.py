"""``.. charlm-options:: COMMAND``: a table of one ``charlm`` command's options and their current defaults.

Read from the click command at build time (the values ``charlm COMMAND --help`` shows), so a
guide's table of defaults cannot drift from the code. The full reference is the CLI page.
"""

from __future__ import annotations

import click
from docutils import nodes
from sphinx.util.docutils import SphinxDirective


def _default(param: click.Option) -> str:
    if isinstance(param.show_default, str):
        return param.show_default
    if param.is_flag:
        return "off"
    if param.default is None or param.default == ():
        return ""
    if isinstance(param.default, float):
        return f"{param.default:g}"
    return str(param.default)


class OptionsDirective(SphinxDirective):
    required_arguments = 1
    has_content = False

    def run(self):
        from charlm.cli import main

        command = main.commands[self.arguments[0]]
        rows = []
        for param in command.params:
            if not isinstance(param, click.Option) or param.hidden:
                continue
            choices = f" One of: {', '.join(param.type.choices)}." if isinstance(param.type, click.Choice) else ""
            rows.append((", ".join(param.opts), _default(param), (param.help or "") + choices))
        table = nodes.table(classes=["charlm-options"])
        group = nodes.tgroup(cols=3)
        table += group
        for width in (22, 18, 60):
            group += nodes.colspec(colwidth=width)
        head, body = nodes.thead(), nodes.tbody()
        group += head
        group += body
        for parent, cells, literal in [(head, ("option", "default", "meaning"), False),
                                       *[(body, r, True) for r in rows]]:
            row = nodes.row()
            for i, text in enumerate(cells):
                entry = nodes.entry()
                para = nodes.paragraph()
                para += nodes.literal(text, text) if literal and i < 2 and text else nodes.Text(text)
                entry += para
                row += entry
            parent += row
        return [table]


def setup(app):
    app.add_directive("charlm-options", OptionsDirective)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
