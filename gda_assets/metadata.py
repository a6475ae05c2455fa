"""Asset metadata helpers shared by every group."""

import base64

import dagster as dg


def png_markdown(png: bytes, alt: str) -> dg.MetadataValue:
    """A PNG inline in markdown metadata, so the Dagster UI shows the picture on the asset page."""
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")
