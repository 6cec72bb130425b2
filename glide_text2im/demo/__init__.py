"""The embedded demo: a procedural captioned dataset of coloured shapes and a pixel judge."""
