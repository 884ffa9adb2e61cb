"""The one retry policy of mlops-tune (tenacity): a few tries of what failed in a known,
passing way (two workers racing to create the same database row, a server closing a
connection mid-answer), waiting a little longer each time; any other error, or the last
try's, is raised as it is.

Example::

    for attempt in retrying(lambda exc: "already exists" in str(exc), attempts=3, wait=0.2):
        with attempt:
            return create_it()
"""

from __future__ import annotations

from collections.abc import Callable

import tenacity


def retrying(when: Callable[[BaseException], bool], attempts: int, wait: float) -> tenacity.Retrying:
    """Up to ``attempts`` tries while the error is one ``when`` accepts, ``wait``, ``2 * wait`` ...
    seconds apart."""
    return tenacity.Retrying(stop=tenacity.stop_after_attempt(attempts),
                             wait=tenacity.wait_incrementing(start=wait, increment=wait),
                             retry=tenacity.retry_if_exception(when), reraise=True)
