"""The exit codes (see surgery/cli/__init__.py)."""

from __future__ import annotations

import errno

EXIT_OK, EXIT_USER_ERROR, EXIT_USAGE, EXIT_VERIFY_FAILED, EXIT_INTERNAL_ERROR = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130
ENVIRONMENT_ERRORS = {
    errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EMFILE, errno.ENFILE, errno.EIO
}  # fmt: skip
