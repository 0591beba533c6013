"""Windows names and paths that an inventory gives: where the agent writes as administrator.

An inventory editor chooses ``microsip.install_dir`` and ``microsip.exe``, and the agent runs
with administrator rights on every workstation: a folder such as ``C:\\Windows\\System32`` or an
``exe`` of ``..\\..\\evil.exe`` would make it write where no MicroSIP belongs. These checks run
on the controller, at load time, so that a bad value is an inventory error with its place.
Pure string checks: nothing here touches a file system.
"""

from __future__ import annotations

import re

# Names Windows maps to devices whatever the folder or extension (NUL, NUL.txt, COM1.ini),
# including the superscript digits it also accepts.
_DEVICES = frozenset(
    {"con", "prn", "aux", "nul", "conin$", "conout$", "clock$"}
    | {f"{port}{digit}" for port in ("com", "lpt") for digit in "0123456789¹²³"}
)
# Characters Windows refuses in a file name, control characters, and the separators.
_BAD_CHARACTER = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f-\x9f]')
# An 8.3 short name (PROGRA~1) names another folder than the one it seems to.
_SHORT_NAME = re.compile(r"~\d")
_DRIVE = re.compile(r"^[A-Za-z]:\\")
_VARIABLE = re.compile(r"^%([^%\\]+)%(?:\\|$)")
MAX_COMPONENT = 255
MAX_PATH = 240  # MAX_PATH (260) less room for "\<name>.ini" and the agent's backup folders

ALLOWED_VARIABLES = ("LOCALAPPDATA", "APPDATA", "USERPROFILE", "ProgramFiles", "ProgramFiles(x86)")
"""Environment variables an ``install_dir`` may start with, expanded on the workstation."""

# Folders of the system drive that hold Windows or every user's data: refused as the install
# folder itself, since portable mode writes MicroSIP's ini next to the program.
_SYSTEM_FOLDERS = frozenset(
    {
        "program files",
        "program files (x86)",
        "programdata",
        "users",
        "users\\public",
        "users\\default",
        "users\\all users",
        "users\\default user",
        "documents and settings",
    }
)
# Folders whose whole tree is Windows' own: refused at any depth.
_SYSTEM_TREES = frozenset(
    {"windows", "system volume information", "$recycle.bin", "recovery", "boot", "config.msi"}
)


def reserved_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a Windows file or folder name as it stands, or None."""
    if name.endswith((".", " ")):
        return "ends with a dot or a space, which Windows drops (it would name another file)"
    if name.split(".", 1)[0].rstrip(" ").lower() in _DEVICES:
        return "is a device name Windows reserves (CON, NUL, AUX, COM1, LPT1 ...)"
    return None


def _name_problem(part: str) -> str | None:
    """Why one name (a file, or one folder of a path) is unsafe, or None; reads after 'it'."""
    bad = _BAD_CHARACTER.search(part)
    if bad is not None:
        char = bad.group(0)
        shown = repr(char) if char.isprintable() else f"U+{ord(char):04X}"
        return f"contains {shown}, which a Windows name cannot hold"
    if len(part) > MAX_COMPONENT:
        return f"is longer than {MAX_COMPONENT} characters"
    if _SHORT_NAME.search(part):
        return "is a short (8.3) name, which may stand for another folder; write the full name"
    return reserved_name_problem(part)


def file_name_problem(name: str) -> str | None:
    """Why ``name`` is not a plain file name (no folder, no device), or None."""
    if "\\" in name or "/" in name:
        return "is a file name only, without a folder (the folder is install_dir)"
    if name in ("", ".", ".."):
        return "is a file name, not '', '.' or '..'"
    return _name_problem(name)


def install_dir_problem(path: str) -> str | None:
    """Why ``path`` may not be MicroSIP's folder, or None.

    Accepted: an absolute local path (``C:\\Program Files\\MicroSIP``), or a path below one of
    :data:`ALLOWED_VARIABLES` (``%LOCALAPPDATA%\\Programs\\MicroSIP``). Refused: relative,
    UNC and device paths, ``.`` and ``..``, forward slashes, short names, reserved names, a
    drive root, the Windows folder and the other system folders.
    """
    if "/" in path:
        return "uses '/'; write Windows paths with backslashes"
    if path.startswith("\\\\"):
        return (
            "is a network or device path; give a local folder such as C:\\Program Files\\MicroSIP"
        )
    if len(path) > MAX_PATH:
        return f"is longer than {MAX_PATH} characters"
    variable = _VARIABLE.match(path)
    if variable is not None:
        name = variable.group(1)
        allowed = {v.lower(): v for v in ALLOWED_VARIABLES}
        if name.lower() not in allowed:
            return (
                f"starts with %{name}%, which is not allowed (allowed: "
                + ", ".join(f"%{v}%" for v in ALLOWED_VARIABLES)
                + ")"
            )
        rest = path[variable.end() :]
        drive = ""
    elif _DRIVE.match(path):
        drive, rest = path[:3], path[3:]
    elif "%" in path.split("\\", 1)[0]:
        return "must start with a drive (C:\\...) or an allowed variable followed by '\\'"
    else:
        return "is not an absolute path: start it with a drive, e.g. C:\\Program Files\\MicroSIP"
    parts = rest.rstrip("\\").split("\\") if rest.rstrip("\\") else []
    if not parts:
        where = "a drive root" if drive else "the variable's folder itself"
        return f"is {where}; give MicroSIP's own folder"
    for part in parts:
        if part in ("", ".", ".."):
            return "has an empty, '.' or '..' folder"
        problem = _name_problem(part)
        if problem is not None:
            return f"has a folder {part!r} that {problem}"
    if "%" in rest:
        return "has a '%' after its start; only a leading variable is expanded"
    if drive:
        lowered = [part.lower() for part in parts]
        if lowered[0] in _SYSTEM_TREES:
            return f"is inside {drive}{parts[0]}, which belongs to Windows"
        if "\\".join(lowered) in _SYSTEM_FOLDERS:
            return "is a system folder; give MicroSIP's own folder below it"
    return None


_ROOT_VARIABLES = ("USERNAME", "USERDOMAIN")
_ANY_VARIABLE = re.compile(r"%([^%\\]*)%")
_UNC_ROOT = re.compile(r"^\\\\[^\\]+\\[^\\]+")


def appdata_root_problem(path: str) -> str | None:
    """Why ``path`` may not be a redirection root of users' AppData, or None.

    A root is a share (``\\\\fs01\\redirect$\\%USERNAME%``) or a local folder
    (``D:\\Profiles\\%USERNAME%``) in which ``%USERNAME%`` stands as a whole folder name, so
    that each user's root is their own: a root shared by all would let one user point their
    AppData at another's. ``%USERDOMAIN%`` may stand as a folder too; nothing else is expanded.
    """
    if "/" in path:
        return "uses '/'; write Windows paths with backslashes"
    if path.startswith(("\\\\?\\", "\\\\.\\")):
        return "is a device path"
    if len(path) > MAX_PATH:
        return f"is longer than {MAX_PATH} characters"
    if _UNC_ROOT.match(path):
        head = path[2:].split("\\", 2)
        parts = head[2].split("\\") if len(head) > 2 and head[2] else []
        names = head[:2]
    elif _DRIVE.match(path):
        parts = path[3:].rstrip("\\").split("\\") if path[3:].rstrip("\\") else []
        names = []
    else:
        return "is not absolute: give a share (\\\\server\\share\\...) or a drive path"
    for name in names:
        if not name or _BAD_CHARACTER.search(name):
            return "has an invalid server or share name"
    if "%USERNAME%".casefold() not in [part.casefold() for part in parts]:
        return (
            "must have %USERNAME% as a folder of its own (e.g. \\\\fs01\\redirect$\\%USERNAME%),"
            " so that no user's root is another's"
        )
    for part in parts:
        if part in ("", ".", ".."):
            return "has an empty, '.' or '..' folder"
        variables = _ANY_VARIABLE.findall(part)
        if variables:
            if part.strip("%").upper() not in _ROOT_VARIABLES or len(variables) != 1:
                return (
                    f"has {part!r}; only %USERNAME% and %USERDOMAIN%, each a whole folder, are "
                    "expanded"
                )
            continue
        if "%" in part:
            return f"has a stray '%' in {part!r}"
        problem = _name_problem(part)
        if problem is not None:
            return f"has a folder {part!r} that {problem}"
    return None
