from langchain_kvagent._stops import scan


def test_no_stops_shows_everything() -> None:
    assert scan("hello\n", []) == ("hello\n", False)


def test_cuts_at_the_earliest_stop_string() -> None:
    assert scan("one. two\n\nthree END", ["END", "\n\n"]) == ("one. two", True)


def test_holds_back_a_tail_that_may_become_a_stop() -> None:
    assert scan("answer: yes\n", ["\n\n"]) == ("answer: yes", False)
    assert scan("abc EN", ["END"]) == ("abc ", False)
    assert scan("abc E", ["END", "Ex"]) == ("abc ", False)


def test_empty_stop_strings_are_ignored() -> None:
    assert scan("text", [""]) == ("text", False)
