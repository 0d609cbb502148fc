"""Research on the shapes domain: auxiliary losses (`losses`), the layout head's fitting
(`layout_fit`), and probes of what the text and the network read (`relation_probe`,
`text_probe`). See README.md beside this file for what was found."""
