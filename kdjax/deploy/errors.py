"""The one error type of the export layer: every bad input it meets becomes one `ExportError` whose text
names the bad thing and what would be valid (the command prints it as one `kdjax: error:` line)."""


class ExportError(ValueError):
    """A bundle, format, batch, output path or optional package that an export cannot use."""
