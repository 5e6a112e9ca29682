"""Images from requests: inline `data:` URLs only, decoded under byte and pixel limits.

No remote URL is fetched and no local path is opened. The pixel count is read from the image
header and checked before any pixel is decoded, so a small file that inflates to a huge bitmap
(a decompression bomb) is refused without allocating it.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, UnidentifiedImageError

from .config import ImageLimits
from .errors import APIError, invalid

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
DATA_URL_EXAMPLE = "data:image/png;base64,iVBORw0KGgo..."


def decode_image_url(url: str, limits: ImageLimits, param: str) -> Image.Image:
    """An RGB PIL image from a `data:image/...;base64,...` URL, or an APIError naming the problem.

    Args:
        url: the `image_url.url` of one content part.
        limits: byte and pixel limits of one image.
        param: where the URL sits in the request, for the error message.
    """
    payload = _data_url_payload(url, param)
    if len(payload) // 4 * 3 > limits.max_bytes + 3:
        raise _too_many_bytes(len(payload) // 4 * 3, limits, param)
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{param}: the data URL's payload is not valid base64", param, "invalid_image") from None
    if len(raw) > limits.max_bytes:
        raise _too_many_bytes(len(raw), limits, param)
    return _open_image(raw, limits, param)


def _data_url_payload(url: str, param: str) -> str:
    """The base64 text of a data URL whose media type is an image."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("http", "https", "ftp"):
        raise invalid(
            f"{param}: remote image URLs are not fetched by this server; send the image inline as a "
            f"base64 data URL ({DATA_URL_EXAMPLE})",
            param,
            "remote_url_not_allowed",
        )
    if scheme != "data":
        raise invalid(
            f"{param}: only base64 data URLs are accepted ({DATA_URL_EXAMPLE}); "
            "local file paths and other URL schemes are refused",
            param,
            "invalid_image_url",
        )
    header, comma, payload = url[len("data:") :].partition(",")
    media_type, *attributes = [part.strip().lower() for part in header.split(";")]
    if not comma or "base64" not in attributes:
        raise invalid(f"{param}: a data URL must be base64-encoded ({DATA_URL_EXAMPLE})", param, "invalid_image_url")
    if media_type and not media_type.startswith("image/"):
        raise invalid(f"{param}: the data URL's media type {media_type!r} is not an image", param, "invalid_image")
    return payload.strip()


def _open_image(raw: bytes, limits: ImageLimits, param: str) -> Image.Image:
    formats = ", ".join(ALLOWED_FORMATS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw), formats=ALLOWED_FORMATS)
            width, height = image.size
            if width * height > limits.max_pixels:
                raise APIError(
                    413,
                    f"{param}: image of {width}x{height} = {width * height} pixels exceeds the limit of "
                    f"{limits.max_pixels} pixels per image (--max-image-pixels)",
                    param=param,
                    code="image_too_large",
                )
            image.load()
    except UnidentifiedImageError:
        raise invalid(f"{param}: not an image (the data decodes as none of {formats})", param, "invalid_image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise APIError(
            413,
            f"{param}: refused as a decompression bomb, beyond the limit of {limits.max_pixels} pixels per image "
            f"(--max-image-pixels; PIL: {error})",
            param=param,
            code="image_too_large",
        ) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise invalid(f"{param}: the image data is truncated or corrupt ({error})", param, "invalid_image") from None
    return image.convert("RGB")


def _too_many_bytes(size: int, limits: ImageLimits, param: str) -> APIError:
    return APIError(
        413,
        f"{param}: image of {size} bytes exceeds the limit of {limits.max_bytes} bytes per image (--max-image-bytes)",
        param=param,
        code="image_too_large",
    )
