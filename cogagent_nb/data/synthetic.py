"""The synthetic GUI dataset: multi-step CogAgent episodes rendered with Pillow.

No public dataset comes in CogAgent's format and nothing may be downloaded, so the course makes its own.
`make_demo_data` writes the official layout (`train.jsonl`, `dev.jsonl`, `test.jsonl`, `images/`):
one sample per step of an episode, each a user turn (prompt + screenshot) and an assistant answer.

An episode is a short task on one of four little apps, e.g. *"Open Settings, go to Network, set the
DNS server to 8.8.4.4, press OK and apply."*, played on a Mac, a Windows desktop or a phone:

    step 0  home screen        CLICK the Settings icon (DOUBLE_CLICK on the Windows desktop)
    step 1  Settings window    CLICK 'Network' in the section list
    step 2  Network page       TYPE the address into the 'DNS server' field
    step 3  field filled in    CLICK 'OK'
    step 4  dialog             CLICK 'Apply'
    step 5  saved              END

Each later step's prompt carries the earlier steps (Grounded Operation + Action sentence) as its
history, and every screen shows the result of the previous step.

Why it is built the way it is (a tiny model later learns it from ~400 samples at 224×224 pixels):
- every target has a fixed look: an app, button or section always has the same colour and glyph
  (`gui_render.STYLE`), and the task text names it by its label, so label → look can be learnt;
- positions vary (window placement, shuffled icons and lists), so the model must *find* the target;
- variety is otherwise small: four apps' tasks, big elements, uncluttered screens;
- boxes are exact: the thousandths come from the very rectangles the renderer filled (`boxes.from_pixels`).

Everything is a function of the seed: one `random.Random` per episode, fixed PNG settings, no clock.
Episode *i* is the same whatever the total, so a larger set extends a smaller one.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from cogagent_nb.data import screens as gr
from cogagent_nb.data.actions import (
    ANSWER_FORMATS,
    GENERAL_TAG,
    PLATFORMS,
    SENSITIVE_TAG,
    Action,
    Answer,
    format_answer,
)
from cogagent_nb.data.boxes import from_pixels
from cogagent_nb.data.prompts import HistoryStep, build_prompt
from cogagent_nb.data.validation import SPLITS  # the split names live with the format

DEFAULT_EPISODES = 96
"""The committed set: 96 episodes ≈ 460 samples, about 3 MB of PNGs."""

PROMPT_ORDER = "official"
"""One order for the whole dataset (see `prompts.py`): mixing orders would earn a validator warning."""

APPS: tuple[str, ...] = ("Settings", "Browser", "Files", "Mail", "Music", "Photos", "Calendar", "Clock", "Maps")
SECTIONS: tuple[str, ...] = ("General", "Network", "Display", "Sound", "Privacy", "Battery")
DNS_SERVERS: tuple[str, ...] = ("8.8.4.4", "1.1.1.1", "9.9.9.9", "8.8.8.8", "1.0.0.1", "208.67.222.222")
QUERIES: tuple[str, ...] = (
    "weather in Paris",
    "cheap flights",
    "python tutorial",
    "pizza near me",
    "train times",
    "news today",
    "currency converter",
    "pancake recipe",
)
FILE_NAMES: tuple[str, ...] = (
    "agenda.docx",
    "backup.zip",
    "budget.csv",
    "contract.pdf",
    "draft.txt",
    "holiday.png",
    "invoice.pdf",
    "logo.png",
    "meeting.txt",
    "notes.txt",
    "photo.png",
    "podcast.mp3",
    "report.pdf",
    "resume.docx",
    "sales.csv",
    "song.mp3",
    "summary.docx",
    "taxes.pdf",
    "todo.txt",
    "travel.pdf",
)
CONTACTS: tuple[str, ...] = (
    "anna@example.com",
    "bob@example.com",
    "chen@example.com",
    "dara@example.com",
    "eve@example.com",
    "farid@example.com",
)
SENDERS: tuple[str, ...] = ("Team Lead", "Newsletter", "Bank", "Mum", "Support", "Calendar", "HR")
DESKTOP_SIZES: tuple[tuple[int, int], ...] = ((640, 400), (800, 500), (960, 600))
"""Desktop resolutions, one per episode: the same window lands at different thousandths on each."""
DISTRACTORS: tuple[str, ...] = ("Help", "Reset", "More", "Close")
"""Grey buttons that are never a target: the model must pick the named button, not any button."""


# --- what one step and one episode hold ------------------------------------------------------------------
@dataclass(frozen=True)
class DemoStep:
    """One screenshot and the correct next move on it."""

    image: Image.Image
    operation: Action  # boxes already in thousandths
    action: str  # the Action sentence (also what later prompts show as history)
    status: str  # what the screen shows (the Status field)
    sensitive: bool = False
    end: bool = False  # the task is done; the answer closes with <<END>>
    widgets: tuple[gr.Widget, ...] = ()  # every element drawn on the screen, with its pixel box


def _step(canvas: gr.Canvas, operation: Action, action: str, status: str, **flags: bool) -> DemoStep:
    """A step on `canvas`, keeping the screen's widgets (what `grounding_samples` points at)."""
    return DemoStep(canvas.image, operation, action, status, widgets=tuple(canvas.widgets.values()), **flags)


@dataclass(frozen=True)
class DemoEpisode:
    """A whole task played on one platform, answered in one format."""

    index: int
    kind: str  # which task template ("network", "search", "files", "mail")
    platform: str
    answer_format: str
    task: str
    plan: str
    steps: tuple[DemoStep, ...]


@dataclass
class DemoDataSummary:
    """What `make_demo_data` wrote: counts per split, platform, answer format and action; total bytes."""

    out_dir: Path
    episodes: dict[str, int] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    platforms: Counter = field(default_factory=Counter)
    answer_formats: Counter = field(default_factory=Counter)
    actions: Counter = field(default_factory=Counter)
    image_bytes: int = 0

    def __str__(self) -> str:
        splits = ", ".join(
            f"{s}: {self.samples.get(s, 0)} samples / {self.episodes.get(s, 0)} episodes" for s in SPLITS
        )
        return "\n".join(
            [
                f"demo data in {self.out_dir}",
                f"  {splits}",
                f"  platforms: {dict(sorted(self.platforms.items()))}",
                f"  answer formats: {dict(sorted(self.answer_formats.items()))}",
                f"  actions: {dict(sorted(self.actions.items()))}",
                f"  images: {sum(self.samples.values())} PNG files, {self.image_bytes / 1e6:.2f} MB",
            ]
        )


# --- shared screens -------------------------------------------------------------------------------------
def _op(name: str, canvas: gr.Canvas, widget: gr.Widget | None = None, **args: object) -> Action:
    """An operation on `canvas`; the box (if any) is the widget's pixel rectangle in thousandths."""
    full: dict[str, object] = {}
    if widget is not None:
        full["box"] = from_pixels(widget.box, canvas.width, canvas.height)
    full.update(args)
    if widget is not None:
        full["element_info"] = widget.label
    return Action(name, full)


def _home_screen(
    rng: random.Random, platform: str, app: str, size: tuple[int, int] = gr.DESKTOP_SIZE
) -> tuple[gr.Canvas, Action, str, str]:
    """The start screen holding `app` among a few others; returns (canvas, open-app op, action, status).

    Mac: apps in the dock (CLICK). Windows: icons on the desktop grid (DOUBLE_CLICK, as on Windows).
    Mobile: icons on the home-screen grid (CLICK = tap).
    """
    others = [a for a in APPS if a != app]
    apps = rng.sample(others, rng.randint(3, 5)) + [app]
    rng.shuffle(apps)
    if platform == "Mac":
        canvas = gr.desktop("Mac", size=size)
        gr.mac_dock(canvas, apps, icon_size=50)
        where, verb, name = "in the dock", "Click", "CLICK"
        status = "The Mac desktop is empty; the dock at the bottom shows the apps."
    elif platform == "WIN":
        canvas = gr.desktop("WIN", size=size)
        columns, rows = (size[0] - 24) // 100, (size[1] - gr.WIN_TASKBAR_HEIGHT - 20) // 110
        cells = rng.sample(list(itertools.product(range(columns), range(rows))), len(apps))
        for a, (col, row) in zip(apps, cells):
            canvas.icon(24 + col * 100, 20 + row * 110, 48, a)
        where, verb, name = "on the desktop", "Double-click", "DOUBLE_CLICK"
        status = "The Windows desktop shows app icons; no window is open."
    else:
        canvas, _ = gr.phone(None)
        cells = rng.sample(list(itertools.product(range(4), range(5))), len(apps))
        for a, (col, row) in zip(apps, cells):
            canvas.icon(22 + col * 86, 60 + row * 110, 56, a, caption_size=13)
        where, verb, name = "on the home screen", "Tap", "CLICK"
        status = "The phone shows its home screen with app icons."
    op = _op(name, canvas, canvas[app])
    return canvas, op, f"{verb} the '{app}' icon {where} to open {app}.", status


def _desktop_size(rng: random.Random, platform: str) -> tuple[int, int]:
    """The episode's screen resolution: one of `DESKTOP_SIZES` on desktops, the phone's size on phones."""
    return gr.PHONE_SIZE if platform == "Mobile" else rng.choice(DESKTOP_SIZES)


def _app_frame(
    rng: random.Random, platform: str, title: str, app: str, size: tuple[int, int] = gr.DESKTOP_SIZE
) -> tuple[gr.Canvas, gr.PixelBox]:
    """An open app: a window at a random place on a desktop of `size`, or a full phone screen with a header.

    The random window geometry on screens of several sizes is what moves every target around the
    desktop screenshots, far more than the targets' own size (see `_phone_offset` for phones).
    """
    if platform == "Mobile":
        canvas, content = gr.phone(title, header_colour=gr.STYLE[app].colour)
        return canvas, content
    canvas = gr.desktop(platform, app_name=app, size=size)
    width, height = rng.randint(440, 560), rng.randint(280, 330)
    top_min = gr.MAC_MENU_HEIGHT + 6 if platform == "Mac" else 6
    bottom_max = canvas.height - (8 if platform == "Mac" else gr.WIN_TASKBAR_HEIGHT + 6)
    left = rng.randint(8, canvas.width - width - 8)
    top = rng.randint(top_min, bottom_max - height)
    content = gr.window(canvas, (left, top, left + width, top + height), title, platform, menu=platform == "WIN")
    return canvas, content


def _phone_offset(rng: random.Random, canvas: gr.Canvas, content: gr.PixelBox) -> int:
    """On phones, a tip card of random height above the content shifts targets vertically."""
    height = rng.choice((0, 40, 60, 80, 100, 120, 140, 160, 180))
    if height:
        left, top, right, _ = content
        canvas.rect((left + 12, top + 10, right - 12, top + height), (241, 245, 249), radius=8)
        canvas.text(
            (left + 24, top + 10 + (height - 10) // 2),
            "Tip: swipe down to refresh",
            size=12,
            fill=gr.MUTED,
            anchor="lm",
        )
    return height + (10 if height else 0)


def _button_row(
    canvas: gr.Canvas,
    platform: str,
    right: int,
    bottom: int,
    primary: str,
    secondary: str = "Cancel",
    width: int = 90,
    height: int = 34,
    *,
    left: int | None = None,
    rng: random.Random | None = None,
) -> None:
    """A primary/secondary button pair; Windows puts the primary first, Mac and phones last.

    With `rng` (and the row's `left` limit) the pair may sit at the left instead of the right, and a
    grey distractor button (`DISTRACTORS`) may join it, so the primary button has no fixed place.
    """
    order = [primary, secondary] if platform == "WIN" else [secondary, primary]
    if rng is not None and rng.random() < 0.5:
        order.insert(rng.randrange(len(order) + 1), rng.choice(DISTRACTORS))
    total = len(order) * width + (len(order) - 1) * 10
    x = right - total
    if rng is not None and left is not None and rng.random() < 0.4:
        x = left
    for label in order:
        canvas.button((x, bottom - height, x + width, bottom), label)
        x += width + 10


# --- task 1: Settings > Network > DNS ---------------------------------------------------------------------
def _settings_screen(
    rng_layout: random.Random,
    platform: str,
    sections: list[str],
    page: str | None,
    dns: str,
    focused: bool = False,
    saved: bool = False,
    dialog: bool = False,
    size: tuple[int, int] = gr.DESKTOP_SIZE,
) -> gr.Canvas:
    """The Settings app: section list (desktop: a sidebar; phone: the first page) and the Network page.

    `rng_layout` is re-seeded by the caller for each screen of one episode, so that the window stays in
    place while its content changes, as it would on a real screen.
    """
    canvas, content = _app_frame(rng_layout, platform, "Settings" if page is None else page, "Settings", size)
    left, top, right, bottom = content
    sidebar_right = rng_layout.random() < 0.5  # two layouts: the section list left or right of the page
    if platform == "Mobile":
        top += _phone_offset(rng_layout, canvas, content)
        if page is None:
            canvas.list_rows(
                (left + 12, top + 10, right - 12, top + 10 + 52 * len(sections) + 2), sections, row_height=52, size=15
            )
            return canvas
        pane = (left + 16, top + 40, right - 16, bottom)
    else:
        list_left = right - 158 if sidebar_right else left + 8
        canvas.list_rows((list_left, top + 8, list_left + 150, bottom - 8), sections, row_height=34, selected=page)
        pane = (
            (left + 14, top + 14, right - 172, bottom - 12)
            if sidebar_right
            else (left + 172, top + 14, right - 14, bottom - 12)
        )
        if page is None:
            canvas.text((pane[0], pane[1] + 6), "General", size=16, fill=gr.BLACK)
            canvas.text((pane[0], pane[1] + 36), "Choose a section on the left.", size=12, fill=gr.MUTED)
            return canvas
    pl, pt, pr, pb = pane
    canvas.text((pl, pt), "Network", size=16, fill=gr.BLACK)
    canvas.text_field((pl, pt + 50, pr, pt + 82), "IP address", "192.168.1.23")
    canvas.text_field((pl, pt + 112, pr, pt + 144), "DNS server", dns, placeholder="e.g. 8.8.8.8", focused=focused)
    if saved:
        canvas.text((pl, pt + 160), "Settings saved.", size=14, fill=(22, 163, 74))
    _button_row(canvas, platform, pr, pb - (24 if platform == "Mobile" else 0), "OK", left=pl, rng=rng_layout)
    if dialog:  # somewhere over the window, not always at its centre
        half = min(170, canvas.width // 2 - 12)
        cx = rng_layout.randint(max(half + 8, content[0] + 40), min(canvas.width - half - 12, content[2] - 40))
        cy = rng_layout.randint(content[1] + 75, max(content[1] + 75, content[3] - 75))
        canvas.dialog(
            (cx - half, cy - 70, cx + half, cy + 70),
            "Apply changes?",
            "The network will reconnect.",
            ("Cancel", "Apply"),
        )
    return canvas


def _episode_network(rng: random.Random, platform: str) -> tuple[str, str, list[DemoStep]]:
    size = _desktop_size(rng, platform)
    dns = rng.choice(DNS_SERVERS)
    sections = rng.sample(SECTIONS, len(SECTIONS))
    layout_seed = rng.random()
    task = f"Open Settings, go to Network, set the DNS server to {dns}, press OK and apply."
    plan = (
        f"1. Open Settings. 2. Open the Network section. 3. Type {dns} into the DNS server field. "
        "4. Press OK. 5. Confirm with Apply."
    )

    def screen(**kwargs: object) -> gr.Canvas:
        return _settings_screen(
            random.Random(layout_seed),
            platform,
            sections,
            size=size,  # type: ignore[arg-type]
            **kwargs,
        )

    home, open_op, open_text, home_status = _home_screen(rng, platform, "Settings", size)
    steps = [_step(home, open_op, open_text, home_status)]
    s = screen(page=None, dns="")
    steps.append(
        _step(
            s,
            _op("CLICK", s, s["Network"]),
            f"{_click(platform)} 'Network' in the list of sections.",
            "Settings is open and lists its sections.",
        )
    )
    s = screen(page="Network", dns="")
    steps.append(
        _step(
            s,
            _op("TYPE", s, s["DNS server"], text=dns),
            f"Type {dns} into the 'DNS server' field.",
            "The Network page is open; the DNS server field is empty.",
        )
    )
    s = screen(page="Network", dns=dns, focused=True)
    steps.append(
        _step(
            s,
            _op("CLICK", s, s["OK"]),
            f"{_click(platform)} the 'OK' button to save the setting.",
            f"The DNS server field now reads {dns}.",
        )
    )
    s = screen(page="Network", dns=dns, focused=True, dialog=True)
    steps.append(
        _step(
            s,
            _op("CLICK", s, s["Apply"]),
            f"{_click(platform)} 'Apply' in the dialog to confirm.",
            "A dialog asks whether to apply the changes.",
            sensitive=True,
        )
    )
    s = screen(page="Network", dns=dns, saved=True)
    steps.append(_end_step(s, f"The DNS server is set to {dns} and the settings are saved."))
    return task, plan, steps


# --- task 2: Browser search -------------------------------------------------------------------------------
def _browser_screen(
    rng_layout: random.Random, platform: str, query: str, results: bool = False, size: tuple[int, int] = gr.DESKTOP_SIZE
) -> gr.Canvas:
    """A browser start page with a search box (placed and sized at random), or the results page."""
    canvas, content = _app_frame(rng_layout, platform, "Browser", "Browser", size)
    left, top, right, bottom = content
    if platform == "Mobile":
        top += _phone_offset(rng_layout, canvas, content)
    box_top = top + rng_layout.randint(70, max(80, (bottom - top) // 2 - 20))
    margin = rng_layout.randint(16, 60) if platform == "Mobile" else rng_layout.randint(30, 110)
    shift = rng_layout.randint(-margin + 8, margin - 8)  # off-centre: the box has no fixed middle
    if results:
        canvas.text_field((left + 16, top + 30, right - 16, top + 62), "Search box", query)
        canvas.text_area(
            (left + 16, top + 80, right - 16, min(bottom - 12, top + 260)),
            "results",
            [f"Results for '{query}'", "", "1. First result", "2. Second result", "3. Third result"],
        )
        return canvas
    cx = (left + right) // 2
    canvas.draw.ellipse((cx - 20, box_top - 60, cx + 20, box_top - 20), fill=gr.STYLE["Browser"].colour)
    canvas.text_field(
        (left + margin + shift, box_top, right - margin + shift, box_top + 38),
        "Search box",
        query,
        placeholder="Search the web",
        focused=bool(query),
        size=14,
    )
    return canvas


def _episode_search(rng: random.Random, platform: str) -> tuple[str, str, list[DemoStep]]:
    size = _desktop_size(rng, platform)
    query = rng.choice(QUERIES)
    layout_seed = rng.random()
    task = f"Open Browser, search for '{query}' and press Enter."
    plan = f"1. Open Browser. 2. Type '{query}' into the search box. 3. Press Enter."

    def screen(**kwargs: object) -> gr.Canvas:
        return _browser_screen(random.Random(layout_seed), platform, size=size, **kwargs)  # type: ignore[arg-type]

    home, open_op, open_text, home_status = _home_screen(rng, platform, "Browser", size)
    steps = [_step(home, open_op, open_text, home_status)]
    s = screen(query="")
    steps.append(
        _step(
            s,
            _op("TYPE", s, s["Search box"], text=query),
            f"Type '{query}' into the search box.",
            "The browser shows its start page.",
        )
    )
    s = screen(query=query)
    steps.append(
        _step(s, Action("KEY_PRESS", {"key": "Enter"}), "Press Enter to search.", f"The search box holds '{query}'.")
    )
    s = screen(query=query, results=True)
    steps.append(_end_step(s, f"The results for '{query}' are shown."))
    return task, plan, steps


# --- task 3: Files, scroll and open -----------------------------------------------------------------------
def _files_screen(
    rng_layout: random.Random,
    platform: str,
    files: list[str],
    first: int,
    opened: str | None = None,
    size: tuple[int, int] = gr.DESKTOP_SIZE,
) -> tuple[gr.Canvas, int]:
    """The file manager's list starting at row `first`, or the viewer of `opened`; returns (canvas, rows).

    On desktops a "Places" sidebar of random width (or none) sits left of the list, so rows start at
    different x positions.
    """
    canvas, content = _app_frame(rng_layout, platform, opened or "Files", "Files", size)
    left, top, right, bottom = content
    if platform == "Mobile":
        top += _phone_offset(rng_layout, canvas, content)
    if opened:
        canvas.text_area(
            (left + 14, top + 14, right - 14, bottom - 14),
            opened,
            [opened, "", "This file is open.", "It has 3 pages."],
        )
        return canvas, 0
    row_height = 44 if platform == "Mobile" else 30
    places = 0 if platform == "Mobile" else rng_layout.choice((0, 0, 90, 130, 170))
    if places:
        canvas.rect((left + 1, top + 1, left + places, bottom - 1), gr.PANEL)
        for i, place in enumerate(("Home", "Desktop", "Documents", "Downloads")):
            canvas.text((left + 12, top + 18 + 26 * i), place, size=12, fill=gr.MUTED)
    list_box = (left + places + 10, top + 10, right - 10, bottom - 10)
    canvas.list_rows(
        list_box, files, row_height=row_height, first=first, size=14 if platform == "Mobile" else 13, name="file list"
    )
    rows = (list_box[3] - list_box[1] - 2) // row_height
    return canvas, rows


def _episode_files(rng: random.Random, platform: str) -> tuple[str, str, list[DemoStep]]:
    size = _desktop_size(rng, platform)
    files = sorted(rng.sample(FILE_NAMES, 14))
    layout_seed = rng.random()
    _, rows = _files_screen(random.Random(layout_seed), platform, files, 0, size=size)
    scroll = min(rows, len(files) - rows)  # rows that move up: one page, or what is left
    target = files[rng.randrange(rows, rows + scroll)]  # hidden at first, visible after the scroll
    verb, name = ("Double-click", "DOUBLE_CLICK") if platform == "WIN" else (_click(platform), "CLICK")
    task = f"Open Files, scroll down to '{target}' and open it."
    plan = f"1. Open Files. 2. Scroll the list down. 3. Open '{target}'."

    def screen(first: int, opened: str | None = None) -> gr.Canvas:
        return _files_screen(random.Random(layout_seed), platform, files, first, opened, size)[0]

    home, open_op, open_text, home_status = _home_screen(rng, platform, "Files", size)
    steps = [_step(home, open_op, open_text, home_status)]
    s = screen(0)
    steps.append(
        _step(
            s,
            _op("SCROLL_DOWN", s, s["file list"], step_count=scroll),
            f"Scroll down the file list to find '{target}'.",
            f"Files lists {rows} files; '{target}' is not visible yet.",
        )
    )
    s = screen(scroll)
    steps.append(
        _step(
            s,
            _op(name, s, s[target]),
            f"{verb} '{target}' to open it.",
            f"The list has scrolled; '{target}' is visible.",
        )
    )
    s = screen(scroll, opened=target)
    steps.append(_end_step(s, f"'{target}' is open."))
    return task, plan, steps


# --- task 4: Mail, compose and send -----------------------------------------------------------------------
def _mail_screen(
    rng_layout: random.Random,
    platform: str,
    senders: list[str],
    stage: str,
    to: str = "",
    size: tuple[int, int] = gr.DESKTOP_SIZE,
) -> gr.Canvas:
    """Mail's inbox (stage 'inbox' / 'sent') or its compose form ('compose')."""
    canvas, content = _app_frame(rng_layout, platform, "New Message" if stage == "compose" else "Mail", "Mail", size)
    left, top, right, bottom = content
    if platform == "Mobile":
        top += _phone_offset(rng_layout, canvas, content)
    compose_right = rng_layout.random() < 0.5
    if stage == "compose":
        field_right = right - 16 - rng_layout.choice((0, 0, 60, 120))  # forms of several widths
        canvas.text_field(
            (left + 16, top + 34, field_right, top + 66), "To", to, placeholder="name@example.com", focused=bool(to)
        )
        canvas.text_field((left + 16, top + 96, field_right, top + 128), "Subject", "Hello")
        _button_row(
            canvas,
            platform,
            right - 16,
            bottom - (24 if platform == "Mobile" else 12),
            "Send",
            left=left + 16,
            rng=rng_layout,
        )
        return canvas
    if platform == "Mobile":
        canvas.list_rows(
            (left + 10, top + 10, right - 10, top + 10 + 50 * len(senders) + 2), senders, row_height=50, kind="message"
        )
        compose_left = right - 140 if compose_right else left + 20
        canvas.button((compose_left, bottom - 60, compose_left + 120, bottom - 16), "Compose", size=15)
    else:
        button_left = right - 126 if compose_right else left + 12
        canvas.button((button_left, top + 10, button_left + 114, top + 44), "Compose")
        canvas.list_rows((left + 10, top + 56, right - 10, bottom - 10), senders, row_height=30, kind="message")
    if stage == "sent":  # a confirmation between the toolbar and the list (desktop), above Compose (phone)
        y = bottom - 86 if platform == "Mobile" else top + 27
        canvas.text(((left + right) // 2, y), "Message sent.", size=14, fill=(22, 163, 74), anchor="mm")
    return canvas


def _episode_mail(rng: random.Random, platform: str) -> tuple[str, str, list[DemoStep]]:
    size = _desktop_size(rng, platform)
    to = rng.choice(CONTACTS)
    senders = rng.sample(SENDERS, 5)
    layout_seed = rng.random()
    task = f"Open Mail, write a new message to {to} and send it."
    plan = f"1. Open Mail. 2. Click Compose. 3. Type {to} into the To field. 4. Click Send."

    def screen(stage: str, to_value: str = "") -> gr.Canvas:
        return _mail_screen(random.Random(layout_seed), platform, senders, stage, to_value, size)

    home, open_op, open_text, home_status = _home_screen(rng, platform, "Mail", size)
    steps = [_step(home, open_op, open_text, home_status)]
    s = screen("inbox")
    steps.append(
        _step(
            s,
            _op("CLICK", s, s["Compose"]),
            f"{_click(platform)} 'Compose' to start a new message.",
            "Mail shows the inbox.",
        )
    )
    s = screen("compose")
    steps.append(
        _step(
            s,
            _op("TYPE", s, s["To"], text=to),
            f"Type {to} into the 'To' field.",
            "A new message form is open; the To field is empty.",
        )
    )
    s = screen("compose", to)
    steps.append(
        _step(
            s,
            _op("CLICK", s, s["Send"]),
            f"{_click(platform)} 'Send' to send the message.",
            f"The To field holds {to}.",
            sensitive=True,
        )
    )
    s = screen("sent")
    steps.append(_end_step(s, "The message has been sent."))
    return task, plan, steps


def _click(platform: str) -> str:
    """The word for a CLICK in Action sentences: phones are tapped."""
    return "Tap" if platform == "Mobile" else "Click"


def _end_step(canvas: gr.Canvas, status: str) -> DemoStep:
    return _step(canvas, Action("END", {}), "The task is complete.", status, end=True)


EPISODE_KINDS: dict[str, Callable[[random.Random, str], tuple[str, str, list[DemoStep]]]] = {
    "network": _episode_network,
    "search": _episode_search,
    "files": _episode_files,
    "mail": _episode_mail,
}
"""Task templates by name; each returns (task, plan, steps) for a platform."""


# --- episodes, samples, files ---------------------------------------------------------------------------
def split_of(index: int) -> str:
    """Train / dev / test by episode (80 / 10 / 10), so no screen of a test task is seen in training.

    Episodes 1, 11, 21, ... are test and 3, 13, 23, ... dev: even a 4-episode set has all three splits.
    """
    return {1: "test", 3: "dev"}.get(index % 10, "train")


def _design(index: int, seed: int) -> tuple[str, str, str]:
    """The (task kind, platform, answer format) of episode `index`, balanced within every split.

    The k-th episode of a split takes kind k mod 4, platform k mod 3 and format k mod 5 of that
    split's seed-shuffled lists. As 3, 4 and 5 share no factor, any 60 consecutive episodes of a split
    cover all 60 combinations, and any 5 (or 3) consecutive ones all formats (or platforms): even the
    10-episode dev and test splits of the default set hold every format and every platform.
    """
    split = split_of(index)
    members = [r for r in range(10) if split_of(r) == split]
    k = index // 10 * len(members) + members.index(index % 10)
    rng = random.Random(seed * 31 + SPLITS.index(split))
    kinds, platforms, formats = (
        rng.sample(names, len(names)) for names in (list(EPISODE_KINDS), PLATFORMS, ANSWER_FORMATS)
    )
    return kinds[k % 4], platforms[k % 3], formats[k % 5]


def make_episode(index: int, *, seed: int = 0) -> DemoEpisode:
    """Render episode `index` of the dataset for `seed` (the same result every time)."""
    kind, platform, answer_format = _design(index, seed)
    rng = random.Random(seed * 1_000_003 + index)
    task, plan, steps = EPISODE_KINDS[kind](rng, platform)
    return DemoEpisode(index, kind, platform, answer_format, task, plan, tuple(steps))


def episode_samples(episode: DemoEpisode, image_names: list[str]) -> list[dict]:
    """The official conversation dicts of an episode: one per step, history growing step by step."""
    samples, history = [], []
    for step, image_name in zip(episode.steps, image_names):
        prompt = build_prompt(episode.task, episode.platform, episode.answer_format, history, order=PROMPT_ORDER)
        answer = Answer(
            status=step.status,
            plan=episode.plan,
            action=step.action,
            operation=step.operation,
            sensitivity=SENSITIVE_TAG if step.sensitive else GENERAL_TAG,
            end=step.end,
        )
        samples.append(
            {
                "messages": [
                    {"role": "user", "content": prompt, "image": image_name},
                    {"role": "assistant", "content": format_answer(answer, episode.answer_format)},
                ]
            }
        )
        history.append(HistoryStep(str(step.operation), step.action))
    return samples


POINTABLE_KINDS: tuple[str, ...] = ("icon", "button", "field", "list_item")
"""Widget kinds `grounding_samples` may point at (only those with a fixed look or a caption)."""


def grounding_samples(episode: DemoEpisode, rng: random.Random, per_step: int = 2) -> list[dict]:
    """Single-step "click X" conversations on the episode's screens, X any drawn element with a fixed look.

    A grounding curriculum in the agent's own format (Action-Operation, empty history), the way the real
    CogAgent was pretrained on GUI grounding before agent data (Hong et al. 2024, arXiv:2312.08914, §2.3):
    an episode step teaches one box per screenshot, these teach `per_step` more on the same screenshot,
    buttons and icons that are *not* the step's target included, so a model learns where every labelled
    element is rather than where a step's target usually sits. Images are the steps' PIL images.
    """
    samples = []
    for step in episode.steps:
        width, height = step.image.size
        candidates = [
            w for w in step.widgets if w.kind in POINTABLE_KINDS and (w.label in gr.STYLE or w.kind == "field")
        ]
        for widget in rng.sample(candidates, min(per_step, len(candidates))):
            verb = "Type into" if widget.kind == "field" else _click(episode.platform)
            task = f"{verb} '{widget.label}'."
            operation = Action("CLICK", {"box": from_pixels(widget.box, width, height), "element_info": widget.label})
            prompt = build_prompt(task, episode.platform, "Action-Operation", (), order=PROMPT_ORDER)
            answer = Answer(action=f"{verb} the '{widget.label}' element.", operation=operation)
            samples.append(
                {
                    "messages": [
                        {"role": "user", "content": prompt, "image": step.image},
                        {"role": "assistant", "content": format_answer(answer, "Action-Operation")},
                    ]
                }
            )
    return samples


# --- the simplest grounding task: one rectangle ---------------------------------------------------------
RECTANGLE_SCREEN = 224
"""Side of a one-rectangle screen in pixels: the tiny tower's image size, so no resize blurs the edges."""


def click_conversation(image: Image.Image, label: str, box_px: tuple[int, int, int, int]) -> dict:
    """A one-step "click `label`" conversation on `image` in the agent's Action-Operation format (WIN)."""
    operation = Action("CLICK", {"box": from_pixels(box_px, *image.size), "element_info": label})
    answer = Answer(action=f"Click the '{label}' element.", operation=operation)
    prompt = build_prompt(f"Click '{label}'.", "WIN", "Action-Operation", (), order=PROMPT_ORDER)
    return {
        "messages": [
            {"role": "user", "content": prompt, "image": image},
            {"role": "assistant", "content": format_answer(answer, "Action-Operation")},
        ],
        "platform": "WIN",
    }


def rectangle_conversation(rng: random.Random, size: int = RECTANGLE_SCREEN) -> dict:
    """ "Click 'box'." on a dark square screen that holds one light rectangle (24-56 x 20-44 px) anywhere.

    Grounding with nothing else in it: no name to match against a look, no look-alikes, no text. A model
    that answers it must read *where* the one thing on the screen is, and nothing but the screenshot can
    tell it (the task text never changes). Lesson 07 trains the tiny model on it for three minutes to
    show grounding appear (docs/BENCHMARKS.md, "Twelfth session"). Draws four numbers from `rng`.
    """
    width, height = rng.randint(24, 56), rng.randint(20, 44)
    left, top = rng.randint(0, size - width), rng.randint(0, size - height)
    box = (left, top, left + width, top + height)
    image = Image.new("RGB", (size, size), (20, 20, 20))
    image.paste((240, 240, 240), box)
    return click_conversation(image, "box", box)


def rectangle_conversations(seed: int) -> Iterator[dict]:
    """Endless fresh one-rectangle conversations (`rectangle_conversation`) drawn from `Random(seed)`."""
    rng = random.Random(seed)
    while True:
        yield rectangle_conversation(rng)


def save_png(image: Image.Image, path: Path) -> int:
    """Write a PNG with fixed settings (same bytes every run) and return its size in bytes.

    The screens use few flat colours, so they are stored as an exact palette image when they fit in
    256 colours (no quantisation error), which makes the files several times smaller.
    """
    colours = image.getcolors(256)
    if colours is not None:
        palette = [value for _, rgb in sorted(colours, key=lambda c: c[1]) for value in rgb]
        lookup = Image.new("P", (1, 1))
        lookup.putpalette(palette)
        image = image.quantize(palette=lookup, dither=Image.Dither.NONE)
    image.save(path, format="PNG", optimize=True)
    return path.stat().st_size


def make_demo_data(
    out_dir: str | Path, *, seed: int = 0, episodes: int = DEFAULT_EPISODES, progress: bool = True
) -> DemoDataSummary:
    """Render `episodes` episodes into `out_dir` in the official layout and return what was written.

    Rewrites `train.jsonl`, `dev.jsonl`, `test.jsonl` (a split without episodes gets no file: fewer than
    4 episodes have no dev split) and the `images/demo_*.png` files it owns; other files are left alone.
    A split file that this function did not write (a line whose screenshot is not one of its
    `images/demo_*.png`) is someone's own data: refused, not replaced.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be at least 1, got {episodes}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir}: is a file; OUT_DIR is the dataset folder to write")
    for split in SPLITS:
        refuse_foreign_split(out_dir / f"{split}.jsonl")
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for old in image_dir.glob("demo_*.png"):
        old.unlink()
    summary = DemoDataSummary(out_dir)
    lines: dict[str, list[str]] = {split: [] for split in SPLITS}
    for index in tqdm(range(episodes), desc="rendering episodes", disable=not progress):
        episode = make_episode(index, seed=seed)
        names = [f"images/demo_{index:05d}_{step}.png" for step in range(len(episode.steps))]
        for step, name in zip(episode.steps, names):
            summary.image_bytes += save_png(step.image, out_dir / name)
            summary.actions[step.operation.name] += 1
        split = split_of(index)
        for sample in episode_samples(episode, names):
            lines[split].append(json.dumps(sample, ensure_ascii=False))
        summary.episodes[split] = summary.episodes.get(split, 0) + 1
        summary.samples[split] = summary.samples.get(split, 0) + len(episode.steps)
        summary.platforms[episode.platform] += len(episode.steps)
        summary.answer_formats[episode.answer_format] += len(episode.steps)
    for split in SPLITS:
        path = out_dir / f"{split}.jsonl"
        if lines[split]:
            path.write_text("".join(line + "\n" for line in lines[split]), encoding="utf-8")
        else:  # fewer than 4 episodes: no file rather than an empty one, which the validator rejects
            path.unlink(missing_ok=True)
    return summary


def refuse_foreign_split(path: Path) -> None:
    """Raise FileExistsError if `path` holds a line that `make_demo_data` did not write."""
    if not path.is_file():
        return
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip() and '"image": "images/demo_' not in line:
                raise FileExistsError(
                    f"{path}:{number}: not written by make-demo-data (its screenshot is not an images/demo_*.png); "
                    "this looks like your own data, so it is not replaced: choose another folder"
                )


# --- a file with mistakes, for learning to read the validator -------------------------------------------
def _flawed_lines() -> list[tuple[str, str]]:
    """(what is wrong, the raw JSONL line) pairs; the first line is correct, each other has one mistake."""
    prompt = build_prompt("Open Settings", "WIN", "Action-Operation", ())

    def line(
        user: dict,
        answer: str | None = "Action: Open Settings.\n"
        "Grounded Operation: CLICK(box=[[40,60,120,180]], element_info='Settings')",
    ) -> str:
        messages = [user] + ([{"role": "assistant", "content": answer}] if answer is not None else [])
        return json.dumps({"messages": messages})

    user = {"role": "user", "content": prompt, "image": "images/screen.png"}
    click = "Action: Open Settings.\nGrounded Operation: CLICK(box=[[{}]], element_info='Settings')"
    return [
        ("nothing: a correct sample", line(user)),
        ("a trailing comma after the last message (invalid JSON)", line(user)[:-2] + ",]}"),
        ("the screenshot file does not exist", line({**user, "image": "images/missing.png"})),
        ("an unknown role", line({**user, "role": "human"})),
        ("no assistant turn", line(user, answer=None)),
        ("an empty assistant answer", line(user, answer="")),
        ("a box coordinate above 999", line(user, click.format("40,60,1200,180"))),
        ("a box whose left edge is right of its right edge", line(user, click.format("120,60,40,180"))),
        (
            "an action name that CogAgent does not have",
            line(user, click.replace("CLICK", "TAP").format("40,60,120,180")),
        ),
    ]


def write_flawed_example(out_dir: str | Path) -> tuple[Path, list[str]]:
    """Write `flawed.jsonl` (plus the one screenshot it needs) into `out_dir`; return (path, mistakes).

    `mistakes[i]` says what is wrong on line i + 1 of the file, so a reader can check the validator's
    report line by line (line 1 is correct on purpose).
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    canvas, *_ = _home_screen(random.Random(0), "WIN", "Settings")
    save_png(canvas.image, out_dir / "images" / "screen.png")
    flawed = _flawed_lines()
    path = out_dir / "flawed.jsonl"
    path.write_text("".join(raw + "\n" for _, raw in flawed), encoding="utf-8")
    return path, [what for what, _ in flawed]


# --- playing an episode: which screen follows which action -----------------------------------------------
def advances(step: DemoStep, action: Action | None) -> bool:
    """Whether doing `action` on `step`'s screen brings up the episode's next screen.

    The synthetic apps react to the right move only, as a strict test harness would: the same action
    name (a Windows desktop icon needs DOUBLE_CLICK; SCROLL_UP does not scroll down), the centre of the
    box (the point the executor clicks) inside the target element, and the same typed text or key
    (keys compared case-insensitively). A scroll of the right list in the right direction shows the
    next page whatever its `step_count`. Anything else leaves the screen as it was.
    """
    expected = step.operation
    if action is None or action.name != expected.name:
        return False
    if expected.box is not None:
        if action.box is None:
            return False
        x, y = (action.box[0] + action.box[2]) / 2, (action.box[1] + action.box[3]) / 2
        x1, y1, x2, y2 = expected.box
        if not (x1 <= x <= x2 and y1 <= y <= y2):
            return False
    for key in ("text", "app", "url"):
        if key in expected.args and str(action.args.get(key, "")).strip() != str(expected.args[key]).strip():
            return False
    if "key" in expected.args:
        return str(action.args.get("key", "")).strip().lower() == str(expected.args["key"]).strip().lower()
    return True
