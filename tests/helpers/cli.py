"""The command line's user-error contract, asserted once: one ``robustdeq: error: ...`` line on
stderr, no traceback."""


def cli_error(capsys, *words) -> str:
    """The captured stderr of a refused command: a ``robustdeq: error:`` message without a
    traceback that contains every one of ``words``; returns it."""
    err = capsys.readouterr().err
    assert err.startswith("robustdeq: error: ") and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err
