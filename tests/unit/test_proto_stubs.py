from swarmrt.wire.protogen import stale_stubs


def test_committed_stubs_match_the_proto():
    assert stale_stubs() == [], "run: python -m swarmrt.wire.protogen"
