"""Every `logwrites` command says what it does, and every option what it is for, in --help;
a description is whole sentences, not a docstring cut mid-sentence."""

from __future__ import annotations

import argparse

from logwrites.cli import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_KERNEL_PANIC, build_parser


def commands(parser: argparse.ArgumentParser, path: str = "logwrites"
             ) -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += commands(sub, f"{path} {name}")
    return found


def test_every_command_and_option_explains_itself() -> None:
    missing = []
    for path, parser in commands(build_parser()):
        leaf = not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)
        if leaf and not parser.description:
            missing.append(f"{path}: no description")
        elif parser.description and not parser.description.rstrip().endswith((".", ")", '"')):
            missing.append(f"{path}: description cut short: ...{parser.description[-40:]!r}")
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not action.help:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}: "
                               "no help")
    assert not missing, "\n".join(missing)


def test_the_command_list_covers_the_documented_commands() -> None:
    names = {path for path, _ in commands(build_parser())}
    assert {"logwrites crash-loop", "logwrites demo", "logwrites run", "logwrites serve",
            "logwrites replay", "logwrites inspect", "logwrites mark", "logwrites status",
            "logwrites guest build"} <= names


def test_the_top_level_help_says_what_logwrites_is_and_its_exit_statuses() -> None:
    parser = build_parser()
    assert parser.description is not None and "dm-log-writes" in parser.description
    assert "command line" not in parser.description      # the module's docstring is for us
    for status in (EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_KERNEL_PANIC):
        assert f"{status} " in (parser.epilog or "")
