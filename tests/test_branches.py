"""Branching conversations: /edit and /regen fork, the old branch is kept, versions are
switched; the prompt is the current path; /save and /load, export and resume keep the tree;
/system is saved with the session."""

from __future__ import annotations

import json

import pytest

from gpt_runtime import commands
from gpt_runtime.errors import QuillError
from gpt_runtime.session import ChatSession
from gpt_runtime.store import Store, default_path

pytestmark = pytest.mark.usefixtures("one_torch_thread", "data_home")  # saved chats of each test its own


def chat(*messages: str, save: bool | None = None) -> ChatSession:
    """A chat with the small model alpha, short replies, and `messages` said."""
    s = ChatSession("alpha", save=save)
    s.set("max_new_tokens", "4")
    for text in messages:
        say(s, text)
    return s


def say(session: ChatSession, text: str) -> str:
    list(session.send(text))
    return session.turns[-1].reply


def users(session: ChatSession) -> list[str]:
    return [t.user for t in session.turns]


def saved_path(session: ChatSession) -> list[tuple[str, str]]:
    with Store(default_path()) as store:
        return [(m.role, m.text) for m in store.path(session.saved_id)]


def conversation(session: ChatSession) -> list[tuple[str, str]]:
    return [pair for t in session.turns for pair in (("user", t.user), ("model", t.reply))]


def prompt_of_last_reply(session: ChatSession) -> str:
    """What the model was given for the last reply, laid out again from the current path."""
    text, _ = session._prompt(len(session.turns) - 1)
    return text


def test_edit_forks_and_keeps_the_old_branch_and_versions_switch_back_and_forth(chat_profiles):
    s = chat("Speak", "hear me", "First")
    old = list(s.turns)
    list(s.edit(2, "Citizen speak"))
    assert users(s) == ["Speak", "Citizen speak"] and s.turns[0] is old[0]
    assert prompt_of_last_reply(s).count("Citizen speak") == 1 and "hear me" not in prompt_of_last_reply(s)
    versions, current = s.versions(1, "user")
    assert [t.user for t in versions] == ["hear me", "Citizen speak"] and current == 1
    s.switch(1, "user", 0)  # back to the old branch, down to where it was: all three turns
    assert s.turns == old and all(a is b for a, b in zip(s.turns, old))
    s.switch(1, "user", 1)
    assert users(s) == ["Speak", "Citizen speak"]
    assert saved_path(s) == conversation(s)  # the saved session follows the switches
    with Store(default_path()) as store:
        assert store.get(s.saved_id).messages == 8  # both branches are saved


def test_regen_keeps_the_previous_reply_as_a_version_and_forks_list_them(chat_profiles):
    s = chat("Speak", "hear me")
    first = s.turns[-1]
    list(s.regenerate())
    second = s.turns[-1]
    assert second is not first and second.user == first.user and second.parent is first.parent
    versions, current = s.versions(1, "model")
    assert versions == [first, second] and current == 1
    assert s.versions(1, "user") == ([second], 0)  # one message, two replies
    (fork,) = s.forks()
    assert (fork.index, fork.role, fork.current, len(fork.versions)) == (1, "model", 1, 2)
    s.switch(1, "model", 0)
    assert s.turns[-1] is first and saved_path(s) == conversation(s)
    with pytest.raises(QuillError, match="reply 2 has 2 versions, not a version 3"):
        s.switch(1, "model", 2)


def test_a_message_said_after_switching_follows_the_branch_switched_to(chat_profiles):
    s = chat("Speak", "hear me")
    list(s.edit(1, "First"))
    s.switch(0, "user", 0)
    say(s, "Resolved")
    assert users(s) == ["Speak", "hear me", "Resolved"]
    assert "First" not in prompt_of_last_reply(s) and "hear me" in prompt_of_last_reply(s)
    assert saved_path(s) == conversation(s)


def test_bad_edits_say_which_messages_can_be_edited(chat_profiles):
    s = ChatSession("alpha")
    with pytest.raises(QuillError, match="no messages to edit yet"):
        s.edit(1, "x")
    say(s, "Speak")
    say(s, "hear me")
    with pytest.raises(QuillError) as exc:
        s.edit(3, "x")
    assert exc.value.message == "there is no message 3 to edit" and exc.value.hint == "your messages are numbered 1 to 2"
    with pytest.raises(QuillError, match="new text"):
        s.edit(1, "   ")
    for line, message in [("/edit", "/edit needs"), ("/edit two words", "a message number"),
                          ("/edit 0 x", "there is no message 0"), ("/edit 2", "new text")]:
        with pytest.raises(QuillError, match=message):
            commands.run(s, line)
    assert users(s) == ["Speak", "hear me"] and len(s.tree) == 2


def test_the_branch_command_lists_the_forks_and_switches(chat_profiles):
    s = chat("Speak", "hear me")
    list(s.regenerate())
    result = commands.run(s, "/edit 1 First")
    assert isinstance(result, commands.Reply) and result.kept == 0
    list(result)
    listing = commands.run(s, "/branch")
    assert "message 1: 2 versions" in listing and "1. Speak" in listing and "2. First  (current)" in listing
    changed = commands.run(s, "/branch 1")
    assert isinstance(changed, commands.TurnsChanged) and changed.kept == 0 and users(s) == ["Speak", "hear me"]
    listing = commands.run(s, "/branch")  # now the reply to "hear me" has its two versions listed too
    assert "reply 2: 2 versions" in listing and "4. " in listing
    commands.run(s, "/branch 3")
    assert s.versions(1, "model")[1] == 0
    with pytest.raises(QuillError, match="no version 9"):
        commands.run(s, "/branch 9")


def test_save_and_load_keep_the_whole_tree(chat_profiles, tmp_path):
    s = chat("Speak", "hear me")
    list(s.regenerate())
    list(s.edit(1, "First"))
    s.set_system("You are a citizen of Rome.")
    s.save(tmp_path / "tree.json")
    other = ChatSession("alpha", save=False)
    assert other.load(tmp_path / "tree.json") == 1
    assert conversation(other) == conversation(s) and len(other.tree) == 4
    assert other.system == "You are a citizen of Rome.\n" and other.template.system == other.system
    other.switch(0, "user", 0)
    assert users(other) == ["Speak", "hear me"] and other.versions(1, "model")[1] == 1
    # A session exported as JSON loads the same way.
    with Store(default_path()) as store:
        (tmp_path / "export.json").write_text(store.export(s.saved_id, "json"), encoding="utf-8")
    third = ChatSession("alpha", save=False)
    third.load(tmp_path / "export.json")
    assert conversation(third) == conversation(s) and len(third.tree) == 4
    third.switch(0, "user", 0)
    assert [t.reply for t in third.versions(1, "model")[0]] == [t.reply for t in s.tree[1:3]]


def test_a_loaded_tree_is_saved_whole_as_a_new_session(chat_profiles, tmp_path):
    s = chat("Speak", save=False)
    list(s.regenerate())
    s.save(tmp_path / "tree.json")
    other = ChatSession("alpha")
    other.load(tmp_path / "tree.json")
    say(other, "hear me")
    with Store(default_path()) as store:
        assert store.get(other.saved_id).messages == 5  # the question, both replies, and the new exchange
    assert saved_path(other) == conversation(other)


def test_resume_rebuilds_the_tree_and_a_search_hit_resumes_at_its_message(chat_profiles):
    s = chat("Speak", "hear me")
    list(s.edit(2, "Citizen"))
    with Store(default_path()) as store:
        (hit,) = store.search("hear")
    other = ChatSession("alpha")
    other.resume("last")
    assert conversation(other) == conversation(s) and len(other.tree) == 3
    assert other.versions(1, "user")[1] == 1
    third = ChatSession("alpha")
    third.resume(hit.session, message=hit.message)
    assert users(third) == ["Speak", "hear me"]
    with Store(default_path()) as store:
        assert [m.text for m in store.path(hit.session)][-2] == "hear me"  # the saved session is there now too
    with pytest.raises(QuillError, match=f"there is no message 999 in session {hit.session}"):
        third.resume(hit.session, message=999)


def test_system_text_changes_the_prompt_and_is_saved_with_the_session(chat_profiles):
    s = chat()
    assert commands.run(s, "/system") == "system text: none (the profile's)"
    assert commands.run(s, "/system Speak like a Roman") == "system text: 'Speak like a Roman'"
    say(s, "Speak")
    assert prompt_of_last_reply(s).startswith("Speak like a Roman\n")
    assert s.turns[-1].provenance.template["system"] == "Speak like a Roman\n"
    other = ChatSession("alpha")
    other.resume("last")
    assert other.system == "Speak like a Roman\n" and other.template.system == other.system
    commands.run(other, "/system --reset")
    assert other.system is None and other.template.system == other.profile.template.system
    third = ChatSession("alpha")
    third.resume("last")
    assert third.system is None
    other.use_profile("beta")  # the conversation's system text goes with it to another profile
    commands.run(other, "/system Friends")
    other.use_profile("alpha")
    assert other.template.system == "Friends\n"


def test_a_transcript_whose_tree_is_bad_is_a_clear_error(chat_profiles, tmp_path):
    s = ChatSession("alpha", save=False)
    good = {"user": "x", "reply": "y", "provenance": None}
    for tree, current in [([{**good, "parent": 1, "asks": 0}, {**good, "parent": None, "asks": 1}], 0),
                          ([{**good, "parent": None, "asks": 0}], 5)]:
        path = tmp_path / "bad.json"
        path.write_text(json.dumps({"format": "quill-transcript", "version": 2, "turns": [], "tree": tree,
                                    "current": current}), encoding="utf-8")
        with pytest.raises(QuillError, match="is not a Quill JSON transcript"):
            s.load(path)
    assert s.turns == [] and s.tree == []


def test_an_undone_exchange_does_not_come_back_when_switching_back(chat_profiles):
    s = chat("Speak", "hear me")
    list(s.edit(1, "First"))
    s.switch(0, "user", 0)
    assert users(s) == ["Speak", "hear me"]
    s.undo()
    s.switch(0, "user", 1)
    s.switch(0, "user", 0)
    assert users(s) == ["Speak"]  # as it was left, not with the exchange /undo took away
    assert saved_path(s) == conversation(s)


def test_a_loaded_export_switches_back_to_the_branch_it_was_on(chat_profiles, tmp_path):
    s = chat("one", "two", "three")  # message ids in the database above the new session's turn count
    s.clear()
    say(s, "Speak")
    say(s, "hear me")
    list(s.edit(2, "Citizen"))
    list(s.edit(1, "First"))
    s.switch(0, "user", 0)
    assert users(s) == ["Speak", "Citizen"]
    with Store(default_path()) as store:
        (tmp_path / "export.json").write_text(store.export(s.saved_id, "json"), encoding="utf-8")
    other = ChatSession("alpha", save=False)
    other.load(tmp_path / "export.json")
    assert users(other) == ["Speak", "Citizen"]
    other.switch(0, "user", 1)
    other.switch(0, "user", 0)
    assert users(other) == ["Speak", "Citizen"]
