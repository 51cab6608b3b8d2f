"""Image bytes: identify a format without decoding (prepare) and decode fully (stream).

Shards keep the original file bytes, so the member extension is taken from the bytes'
real format (a PNG named .jpg is stored as .png), never from the file name.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

# PIL format name -> shard member extension.
FORMAT_EXTENSIONS: dict[str, str] = {
    "JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff",
}
IMAGE_EXTENSIONS: frozenset[str] = frozenset(FORMAT_EXTENSIONS.values()) | {"jpeg", "tif"}


class ImageDecodeError(ValueError):
    """Bytes that are not a complete, decodable image."""


def sniff_extension(data: bytes) -> str:
    """Shard extension for image bytes, from the header only (cheap: no pixel decoding).

    A truncated file usually passes: it is caught when the stream decodes it.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ImageDecodeError(f"not a readable image ({err})") from err
    if fmt not in FORMAT_EXTENSIONS:
        raise ImageDecodeError(f"unsupported image format {fmt}")
    return FORMAT_EXTENSIONS[fmt]


def decode_image(data: bytes) -> Image.Image:
    """Decode all pixels now, so a truncated or corrupt file fails here and not in a collator.

    The image keeps its mode (L, RGBA, CMYK, ...): conversion to RGB is part of the shared
    preprocessing (`data.collate.to_rgb`).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as err:
        raise ImageDecodeError(str(err) or type(err).__name__) from err
    return image
