"""The approval rule, in the pure factory: who counts, which head an approval holds for."""
import patchrelay as pr
from patchrelay import PullRequestObs, ReviewObs


def review(author, state, commit, at, association="MEMBER", author_id=None):
    return ReviewObs(id=f"{author}-{at}", state=state, body="", author=author, association=association,
                     submitted_at=f"2026-12-01T10:00:{at:02d}Z", commit=commit, author_id=author_id or f"U_{author}")


def pull(head, *reviews):
    return PullRequestObs(number=1, node_id="PR_1", url="https://github.test/acme/app/pull/1", state="OPEN",
                          merged=False, draft=False, head_ref="app/APP-1", head_sha=head, base_ref="main",
                          head_repo="acme/app", author="patchrelay-bot", mergeable="MERGEABLE",
                          review_decision="APPROVED", in_queue=False, queue_state=None, reviews=tuple(reviews))


def test_an_approval_holds_for_its_head_and_through_clean_merges_only():
    assert pr.carries_over("A", "A", {})
    assert pr.carries_over("A", "M2", {"M2": "M1", "M1": "A"})          # two clean base merges on top of A
    assert not pr.carries_over("A", "B", {"M1": "A"})                    # B is not a clean merge of ours
    assert not pr.carries_over("A", "M", {"M": "X"})                     # a clean merge onto another head
    assert not pr.carries_over(None, "A", {})
    assert not pr.carries_over("A", "M", {"M": "N", "N": "M"})           # a loop ends, never hangs


def test_the_latest_opinion_of_each_trusted_reviewer_decides():
    a = pr.pinned_approval(pull("B", review("alice", "APPROVED", "A", 1)), (), {})
    assert (a.approved, a.stale, a.approvers, a.approver_ids) == (False, True, ("alice",), ("U_alice",))
    a = pr.pinned_approval(pull("B", review("alice", "APPROVED", "A", 1), review("alice", "APPROVED", "B", 2)), (), {})
    assert a.approved and not a.stale
    a = pr.pinned_approval(pull("B", review("alice", "APPROVED", "B", 1), review("alice", "DISMISSED", "B", 2)), (), {})
    assert not a.approved and not a.stale                                 # a dismissal cancels it
    a = pr.pinned_approval(pull("B", review("alice", "APPROVED", "B", 1),
                                review("bob", "CHANGES_REQUESTED", "B", 2)), (), {})
    assert a.approved and a.blocked_by == ("bob",)
    a = pr.pinned_approval(pull("B", review("alice", "APPROVED", "B", 1), review("alice", "COMMENTED", "B", 2)), (), {})
    assert a.approved                                                     # a comment is no opinion


def test_only_trusted_reviewers_count():
    untrusted = pull("B", review("mallory", "APPROVED", "B", 1, association="CONTRIBUTOR"))
    assert not pr.pinned_approval(untrusted, (), {}).approved
    listed = pull("B", review("carol", "APPROVED", "B", 1, association="MEMBER"))
    assert not pr.pinned_approval(listed, ("alice",), {}).approved        # trusted_reviewers narrows it
    assert pr.pinned_approval(listed, ("carol",), {}).approved
