"""`dreambooth ui`: a local web page over the same library functions as the CLI.

The page is a thin layer: every check is the library's own (its messages are the CLI's, shown
next to the field that caused them), and every long job — train, resume, sample, sweep, export —
is the CLI command itself, run by ``runjob`` in a background process that outlives the page and
the server. The run directory is the only state; the page reads it back after a reload.

    forms.py    the new-subject form: intake table, identifier picks, base models, the
                advanced settings (generated from the config dataclasses), checks, the plan
    jobs.py     background CLI commands: a queue (one job at a time), stop, their state on disk
    runjob.py   the worker process: runs one CLI command and records how it ended
    runs.py     what a run directory holds, as the page shows it (progress, ETA, grids, exports)
    server.py   the web app (Starlette + uvicorn): the only module that imports them
    static/     the page (plain HTML, CSS and JavaScript: nothing fetched from the internet)
"""
