"""Configuration files from outside (issue 25, finding 9): the clients file, the points
table, the calendar files, the issuing banks and the TLS PEM files. Each is a regular file of
at most `config.config_file_bytes_max` bytes (4 MiB), read once: a device (`/dev/zero`), a
FIFO or a directory is refused as soon as it is opened, before anything is read, and a larger
file is refused by its size. TOML that is not UTF-8, does not parse, or nests deeper than the
parser can follow is one `ConfigFileError` (a ValueError) naming the file and what is wrong;
what the document holds is checked by each reader."""
import os
import stat
import tomllib

from yikatong import config


class ConfigFileError(ValueError):
    """A configuration file that cannot be used, in one line naming it."""


def read_bytes(path: str, name: str = "") -> bytes:
    """The whole of `path`, a regular file of at most config.config_file_bytes_max bytes.
    `name` is how messages call the file (default: its path)."""
    name = name or path
    limit = config.config_file_bytes_max
    try:
        # O_NONBLOCK: opening a FIFO with no writer returns at once instead of waiting
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as error:
        raise ConfigFileError(f"{name}: {error.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a device, FIFO or socket"
            raise ConfigFileError(f"{name}: is {kind}, not a regular file")
        if st.st_size > limit:
            raise ConfigFileError(f"{name}: {st.st_size} bytes; a configuration file has at "
                                  f"most {limit}")
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, limit + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:  # it grew while read
            raise ConfigFileError(f"{name}: more than {limit} bytes; a configuration file has "
                                  f"at most {limit}")
        return b"".join(chunks)
    except OSError as error:
        raise ConfigFileError(f"{name}: {error.strerror}") from None
    finally:
        os.close(fd)


def parse_toml(text: str | bytes, name: str) -> dict:
    """A TOML document (bytes: UTF-8), or ConfigFileError naming `name`."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ConfigFileError(f"{name}: not UTF-8 (byte {error.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigFileError(f"{name}: TOMLDecodeError: {error}") from None
    except RecursionError:
        raise ConfigFileError(f"{name}: arrays or tables nested too deeply to read") from None


def read_toml(path: str, name: str = "") -> dict:
    """`path`'s TOML document: read_bytes, then parse_toml."""
    return parse_toml(read_bytes(path, name), name or path)
