"""What a study shows: the live status line (``progress``), the end-of-study summary and
report (``report``, drawn by ``page`` and ``svg``) and the JUnit file a CI server reads (``junit``)."""
