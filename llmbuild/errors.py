"""Error types with a defined exit status.

`UserError` is anything the user can fix (bad recipe, missing file, request beyond
limits): the CLI prints its message and exits 2, never a traceback.
`BuildError` is a failure while doing the work (engine build failed, verification
missed its thresholds): exit 1.
"""


class LlmbuildError(Exception):
    exit_code = 1


class UserError(LlmbuildError):
    exit_code = 2


class BuildError(LlmbuildError):
    exit_code = 1
