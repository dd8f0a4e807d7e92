"""Images of a request: ``image_url`` parts turned into upright RGB PIL images, under the operator's rules.

- ``data:`` URLs (base64 PNG, JPEG, WebP or GIF, first frame) are always accepted.
- ``file://`` URLs only under ``--allowed-local-media-path DIR`` (vLLM's name): the path is resolved,
  symlinks and ``..`` included, and must still lie inside DIR.
- ``http(s)://`` URLs only with ``--allow-remote-images``; then every address the URL (and each redirect)
  resolves to must be public (no loopback, private, link-local or reserved address: no requests into
  the operator's network), the connection goes to the address that was checked, and the download has
  a size limit and a deadline.

Only the four formats are decoded, and images over Pillow's decompression-bomb warning size are refused
before decoding, so a small upload cannot make the server allocate gigabytes.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

from PIL import Image, UnidentifiedImageError

from ..utils.io import load_image

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
MAX_IMAGE_BYTES = 20 * 2**20  # a file or download; the web demo's upload limit
FETCH_TIMEOUT_S = 10.0  # the whole download of one remote image, redirects included
MAX_REDIRECTS = 3
_REDIRECTS = (301, 302, 303, 307, 308)
_READ_BYTES = 64 * 1024


class MediaError(ValueError):
    """An image URL that is refused or cannot be read; the message says which rule or problem."""


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def is_public_address(address: IPAddress) -> bool:
    """A globally routable unicast address (an IPv4-mapped IPv6 address is judged as its IPv4 one)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


@dataclass(frozen=True)
class MediaPolicy:
    """Where images may come from; ``load(url)`` applies it."""

    local_root: Path | None = None  # --allowed-local-media-path
    allow_remote: bool = False  # --allow-remote-images
    max_bytes: int = MAX_IMAGE_BYTES
    timeout_s: float = FETCH_TIMEOUT_S
    address_allowed: Callable[[IPAddress], bool] = field(default=is_public_address)

    def __post_init__(self):
        if self.local_root is not None:
            root = Path(self.local_root).resolve()
            if not root.is_dir():
                raise ValueError(f"--allowed-local-media-path {self.local_root}: not a folder")
            object.__setattr__(self, "local_root", root)

    def load(self, url: str) -> Image.Image:
        scheme = urlsplit(url).scheme.lower()
        if scheme == "data":
            return decode_image(_data_url_bytes(url))
        if scheme == "file":
            return decode_image(self._local_bytes(url))
        if scheme in ("http", "https"):
            if not self.allow_remote:
                raise MediaError("remote image URLs are refused: the server was started without --allow-remote-images")
            return decode_image(self._remote_bytes(url))
        raise MediaError(f"unsupported image URL scheme {scheme!r}: use a data: URL, file:// or http(s)://")

    def _local_bytes(self, url: str) -> bytes:
        if self.local_root is None:
            raise MediaError("local image files are refused: the server was started without --allowed-local-media-path")
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise MediaError(f"file URL {url!r} names a host; use file:///absolute/path")
        try:
            path = Path(unquote(parts.path)).resolve(strict=True)
        except (OSError, RuntimeError):
            raise MediaError(f"image file not found: {unquote(parts.path)}") from None
        if not path.is_relative_to(self.local_root):
            raise MediaError(f"image file {unquote(parts.path)} is outside the allowed folder {self.local_root}")
        if not path.is_file():
            raise MediaError(f"{unquote(parts.path)} is not a file")
        if path.stat().st_size > self.max_bytes:
            raise MediaError(f"image file {unquote(parts.path)} is over the {self.max_bytes:,}-byte limit")
        return path.read_bytes()

    def _remote_bytes(self, url: str) -> bytes:
        deadline = time.monotonic() + self.timeout_s
        for _ in range(MAX_REDIRECTS + 1):
            connection, target = self._connect(url, deadline)
            try:
                connection.request("GET", target, headers={"Accept": "image/*", "User-Agent": "deepseek-vl2"})
                response = connection.getresponse()
                if response.status in _REDIRECTS and response.getheader("Location"):
                    url = urljoin(url, response.getheader("Location"))
                    continue
                if response.status != 200:
                    raise MediaError(f"image URL {url} answered HTTP {response.status}")
                return self._read_limited(response, url, deadline)
            except (OSError, http.client.HTTPException) as error:
                raise MediaError(f"image URL {url} could not be fetched ({error or type(error).__name__})") from None
            finally:
                connection.close()
        raise MediaError(f"image URL redirected more than {MAX_REDIRECTS} times")

    def _connect(self, url: str, deadline: float) -> tuple[http.client.HTTPConnection, str]:
        """A connection to the checked address of ``url``'s host, and the request target."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise MediaError(f"image URL {url!r}: only http(s) URLs with a host can be fetched")
        port = parts.port or (443 if scheme == "https" else 80)
        address = self._checked_address(parts.hostname, port)
        remaining = _remaining(deadline, url)
        kind = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return kind(parts.hostname, port, address, timeout=remaining), target

    def _checked_address(self, host: str, port: int) -> str:
        try:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as error:
            raise MediaError(f"image URL host {host!r} cannot be resolved ({error})") from None
        addresses = [ipaddress.ip_address(entry[4][0].split("%")[0]) for entry in found]
        refused = [str(address) for address in addresses if not self.address_allowed(address)]
        if refused:
            raise MediaError(f"image URL host {host!r} resolves to a non-public address ({refused[0]}); refused")
        return str(addresses[0])

    def _read_limited(self, response, url: str, deadline: float) -> bytes:
        declared = response.getheader("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise MediaError(f"image URL {url} is {int(declared):,} bytes, over the {self.max_bytes:,}-byte limit")
        data = bytearray()
        while chunk := response.read1(_READ_BYTES):
            data += chunk
            if len(data) > self.max_bytes:
                raise MediaError(f"image URL {url} is over the {self.max_bytes:,}-byte limit")
            _remaining(deadline, url)  # each read waits at most the time left when connecting
        return bytes(data)


def _remaining(deadline: float, url: str) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise MediaError(f"image URL {url} took longer than the download timeout")
    return remaining


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the address that was checked, not to whatever the host name resolves to next."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self):
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to the checked address, with the certificate verified for the host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self):
        raw = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=self.host)


def _data_url_bytes(url: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma:
        raise MediaError("a data: URL needs a comma before its data")
    media_type, *options = header.removeprefix("data:").split(";")
    if not media_type.lower().startswith("image/"):
        raise MediaError(f"a data: URL of type {media_type or 'text/plain'!r} is not an image")
    if "base64" not in (option.lower() for option in options):
        raise MediaError("an image data: URL must be base64-encoded (data:image/png;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise MediaError(f"the data: URL is not valid base64 ({error})") from None


def decode_image(data: bytes) -> Image.Image:
    """Upright RGB from PNG, JPEG, WebP or GIF bytes (first frame), refused over Pillow's warning size."""
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as opened:
            width, height = opened.size
            if width * height > Image.MAX_IMAGE_PIXELS:
                raise MediaError(
                    f"the image is {width}x{height} pixels, over the {Image.MAX_IMAGE_PIXELS:,}-pixel limit"
                )
            opened.seek(0)
            return load_image(opened)
    except UnidentifiedImageError:
        raise MediaError(f"not a PNG, JPEG, WebP or GIF image ({len(data):,} bytes)") from None
    except Image.DecompressionBombError as error:
        raise MediaError(f"the image is too large ({error})") from None
    except OSError as error:  # truncated or corrupt data, found while decoding
        raise MediaError(f"the image could not be decoded ({error})") from None
