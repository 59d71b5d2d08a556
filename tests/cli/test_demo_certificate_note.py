"""The demo sets its certificate beside its attack table at the same Linf radii (the bracket)."""
from robustdeq.demo import DEMO_EPS, certificate_note


def _table(worst):
    return {f"{e:g}": {"worst case": w} for e, w in zip(DEMO_EPS, worst)}


def test_the_note_states_the_bracket_at_the_tables_radii():
    summary = {"certified_accuracy_linf": {"0.1": 0.25, "0.2": 0.0}}
    note = certificate_note(summary, _table([0.45, 0.0]))
    assert "Linf 0.1: certified 25.0% <= robust <= 45.0% (attacked)" in note
    assert "Linf 0.2: certified 0.0% <= robust <= 0.0% (attacked)" in note
    assert "--defense ibp" not in note  # something was certified


def test_nothing_certified_says_how_to_get_certificates():
    note = certificate_note({"certified_accuracy_linf": {"0.1": 0.0, "0.2": 0.0}}, _table([0.45, 0.0]))
    assert "certified at none of the table's radii" in note and "--defense ibp" in note


def test_no_linf_certificate_is_said_not_invented():
    assert certificate_note({"certified_accuracy_l2": {"0.1": 0.0}}, _table([0.45, 0.0])).endswith("not available")
