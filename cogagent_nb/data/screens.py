"""Drawing primitives for synthetic GUI screenshots (desktop windows and phone screens).

The synthetic dataset (`demo_data.py`) needs screenshots whose clickable elements have *exact* boxes.
So every primitive here draws one element and returns a `Widget` holding the pixel rectangle it filled;
the dataset turns that rectangle into CogAgent's thousandths. Nothing is measured after the fact.

Design choices, all for a tiny model that sees the screen at 224×224:
- flat colours, big elements, one consistent colour and glyph per app or button label (`STYLE`), so an
  element is recognisable after a 3× downscale even when its label text is not readable;
- text is drawn without anti-aliasing (`fontmode = "1"`) with Pillow's built-in font: no font files to
  download, few distinct colours, small PNG files and identical bytes on every run.

Pixel boxes are `(left, top, right, bottom)` with `right`/`bottom` exclusive: a box covers the pixels
`left <= x < right`, `top <= y < bottom`, so its width is `right - left`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from PIL import Image, ImageDraw, ImageFont

PixelBox = tuple[int, int, int, int]
Colour = tuple[int, int, int]

WHITE: Colour = (255, 255, 255)
BLACK: Colour = (20, 20, 24)
TEXT: Colour = (40, 40, 48)
MUTED: Colour = (120, 120, 130)
BORDER: Colour = (160, 160, 170)
PANEL: Colour = (244, 244, 246)


@dataclass(frozen=True)
class ElementStyle:
    """How one named element looks everywhere in the dataset: its colour and glyph never change."""

    colour: Colour
    glyph: str = "none"  # one of the shapes drawn by `_glyph`


# One entry per label. Keeping label → look fixed is what makes the dataset learnable from pixels.
STYLE: dict[str, ElementStyle] = {
    # apps (icons on the Mac dock, the Windows desktop, the phone home screen)
    "Settings": ElementStyle((96, 104, 120), "gear"),
    "Browser": ElementStyle((18, 150, 136), "globe"),
    "Files": ElementStyle((240, 150, 20), "folder"),
    "Mail": ElementStyle((37, 99, 235), "envelope"),
    "Music": ElementStyle((225, 29, 72), "note"),
    "Photos": ElementStyle((147, 51, 234), "mountain"),
    "Calendar": ElementStyle((220, 38, 38), "calendar"),
    "Clock": ElementStyle((30, 30, 36), "clock"),
    "Maps": ElementStyle((101, 163, 13), "pin"),
    # buttons
    "OK": ElementStyle((22, 163, 74)),
    "Cancel": ElementStyle((156, 163, 175)),
    "Apply": ElementStyle((234, 88, 12)),
    "Send": ElementStyle((37, 99, 235)),
    "Compose": ElementStyle((79, 70, 229)),
    "Search": ElementStyle((18, 150, 136)),
    # settings sections (coloured dots in the side list)
    "General": ElementStyle((107, 114, 128), "dot"),
    "Network": ElementStyle((14, 116, 244), "dot"),
    "Display": ElementStyle((250, 204, 21), "dot"),
    "Sound": ElementStyle((236, 72, 153), "dot"),
    "Privacy": ElementStyle((16, 185, 129), "dot"),
    "Battery": ElementStyle((132, 204, 22), "dot"),
}


@dataclass(frozen=True)
class Widget:
    """One drawn element: what it is, its label, and the exact pixel rectangle it covers."""

    kind: str  # "icon", "button", "field", "list_item", "list", "text_area", "menu", ...
    label: str
    box: PixelBox

    @property
    def center(self) -> tuple[int, int]:
        left, top, right, bottom = self.box
        return (left + right) // 2, (top + bottom) // 2


@cache
def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at `size` pixels (the bitmap font on Pillow builds without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no size argument
        return ImageFont.load_default()


def _darker(colour: Colour, factor: float = 0.7) -> Colour:
    return tuple(int(c * factor) for c in colour)  # type: ignore[return-value]


def _text_colour_on(fill: Colour) -> Colour:
    """Black or white, whichever reads better on `fill` (relative luminance threshold)."""
    r, g, b = fill
    return BLACK if 0.299 * r + 0.587 * g + 0.114 * b > 160 else WHITE


class Canvas:
    """A screenshot being drawn, plus the widgets drawn on it so far (by label)."""

    def __init__(self, width: int, height: int, background: Colour) -> None:
        self.width, self.height = width, height
        self.image = Image.new("RGB", (width, height), background)
        self.draw = ImageDraw.Draw(self.image)
        self.draw.fontmode = "1"  # no anti-aliasing: fewer colours, smaller PNGs, crisp at any scale
        self.widgets: dict[str, Widget] = {}

    # --- bookkeeping ---------------------------------------------------------------------------------
    def register(self, kind: str, label: str, box: PixelBox) -> Widget:
        """Remember an element under its label (later elements with the same label replace it)."""
        widget = Widget(kind, label, box)
        self.widgets[label] = widget
        return widget

    def __getitem__(self, label: str) -> Widget:
        try:
            return self.widgets[label]
        except KeyError:
            raise KeyError(f"no widget labelled {label!r} on this screen; have {sorted(self.widgets)}") from None

    # --- basic shapes --------------------------------------------------------------------------------
    def rect(self, box: PixelBox, fill: Colour | None, outline: Colour | None = None, radius: int = 0) -> None:
        """Fill exactly the pixels of `box` (exclusive right/bottom, see the module docstring)."""
        left, top, right, bottom = box
        shape = (left, top, right - 1, bottom - 1)
        if radius:
            self.draw.rounded_rectangle(shape, radius=radius, fill=fill, outline=outline)
        else:
            self.draw.rectangle(shape, fill=fill, outline=outline)

    def text(self, xy: tuple[int, int], text: str, *, size: int = 12, fill: Colour = TEXT, anchor: str = "la") -> None:
        self.draw.text(xy, text, font=font(size), fill=fill, anchor=anchor)

    def text_width(self, text: str, size: int = 12) -> int:
        return int(self.draw.textlength(text, font=font(size)))

    # --- elements --------------------------------------------------------------------------------------
    def icon(
        self,
        left: int,
        top: int,
        size: int,
        label: str,
        *,
        caption_colour: Colour = WHITE,
        caption_size: int = 12,
        kind: str = "icon",
    ) -> Widget:
        """An app icon: a rounded square in the app's colour with its glyph, and the name underneath.

        The widget's box covers the square and the caption, as a desktop selection highlight does.
        """
        style = STYLE[label]
        square = (left, top, left + size, top + size)
        self.rect(square, style.colour, radius=size // 5)
        _glyph(self.draw, style.glyph, square)
        caption_top = top + size + 3
        self.text((left + size // 2, caption_top), label, size=caption_size, fill=caption_colour, anchor="ma")
        half = max(size, self.text_width(label, caption_size)) // 2 + 1
        middle = left + size // 2
        return self.register(kind, label, (middle - half, top, middle + half, caption_top + caption_size + 2))

    def button(self, box: PixelBox, label: str, *, size: int = 13) -> Widget:
        """A filled button in the label's colour (`STYLE`), label centred."""
        fill = STYLE[label].colour if label in STYLE else (229, 231, 235)
        self.rect(box, fill, outline=_darker(fill), radius=6)
        centre = ((box[0] + box[2]) // 2, (box[1] + box[3]) // 2)
        self.text(centre, label, size=size, fill=_text_colour_on(fill), anchor="mm")
        return self.register("button", label, box)

    def text_field(
        self,
        box: PixelBox,
        label: str,
        value: str = "",
        *,
        placeholder: str = "",
        focused: bool = False,
        size: int = 13,
    ) -> Widget:
        """A single-line input; `label` names it (shown as a caption above the box)."""
        self.text((box[0], box[1] - size - 4), label, size=size - 1, fill=MUTED)
        self.rect(box, WHITE, outline=(37, 99, 235) if focused else BORDER, radius=4)
        middle = (box[1] + box[3]) // 2
        if value:
            self.text((box[0] + 8, middle), value, size=size, fill=TEXT, anchor="lm")
        elif placeholder:
            self.text((box[0] + 8, middle), placeholder, size=size, fill=(170, 170, 178), anchor="lm")
        return self.register("field", label, box)

    def list_rows(
        self,
        box: PixelBox,
        items: list[str],
        *,
        row_height: int,
        first: int = 0,
        selected: str | None = None,
        size: int = 13,
        kind: str = "list_item",
        name: str = "list",
    ) -> Widget:
        """A vertical list clipped to `box`, showing `items[first:]`; each visible row is a widget.

        Items with a `STYLE` entry get their coloured dot; others (file names) get a grey page glyph.
        Returns the widget of the whole list area (the box a SCROLL acts on).
        """
        left, top, right, bottom = box
        self.rect(box, WHITE, outline=BORDER)
        y = top + 1
        for item in items[first:]:
            if y + row_height > bottom - 1:
                break
            row = (left + 1, y, right - 1, y + row_height)
            if item == selected:
                self.rect(row, (219, 234, 254))
            dot = STYLE[item].colour if item in STYLE else _file_colour(item)
            cy = y + row_height // 2
            self.rect((left + 10, cy - 7, left + 24, cy + 7), dot, radius=3)
            self.text((left + 34, cy), item, size=size, fill=TEXT, anchor="lm")
            self.draw.line((left + 1, y + row_height - 1, right - 2, y + row_height - 1), fill=(229, 231, 235))
            self.register(kind, item, row)
            y += row_height
        return self.register("list", name, box)

    def text_area(self, box: PixelBox, label: str, lines: list[str], *, size: int = 13) -> Widget:
        """A multi-line read-only text block (page content, message bodies)."""
        self.rect(box, WHITE, outline=BORDER)
        for i, line in enumerate(lines):
            self.text((box[0] + 10, box[1] + 10 + i * (size + 6)), line, size=size)
        return self.register("text_area", label, box)

    def dialog(self, box: PixelBox, title: str, message: str, buttons: tuple[str, ...]) -> list[Widget]:
        """A modal dialog with a shadow, a title, one message line and a row of buttons (right-aligned)."""
        left, top, right, bottom = box
        self.rect((left + 4, top + 4, right + 4, bottom + 4), (90, 90, 100), radius=10)
        self.rect(box, PANEL, outline=BORDER, radius=10)
        self.text((left + 16, top + 14), title, size=14, fill=BLACK)
        self.text((left + 16, top + 40), message, size=12, fill=TEXT)
        widgets = []
        x = right - 16
        for label in reversed(buttons):
            width = 84
            widgets.append(self.button((x - width, bottom - 48, x, bottom - 14), label))
            x -= width + 10
        self.register("dialog", title, box)
        return widgets[::-1]


def _file_colour(name: str) -> Colour:
    """File rows are coloured by extension, as file managers do."""
    extension = name.rsplit(".", 1)[-1]
    return {
        "pdf": (220, 38, 38),
        "png": (22, 163, 74),
        "txt": (107, 114, 128),
        "csv": (13, 148, 136),
        "docx": (37, 99, 235),
        "zip": (180, 83, 9),
        "mp3": (219, 39, 119),
    }.get(extension, (148, 163, 184))


def _glyph(draw: ImageDraw.ImageDraw, glyph: str, square: PixelBox) -> None:
    """A simple white shape inside an icon square, distinct per app (recognisable when downscaled)."""
    left, top, right, bottom = square
    w = right - left
    cx, cy = (left + right) // 2, (top + bottom) // 2
    r = w // 4
    if glyph == "gear":
        for dx, dy in ((0, -1), (0, 1), (-1, 0), (1, 0)):
            draw.rectangle(
                (cx + dx * r - w // 14, cy + dy * r - w // 14, cx + dx * r + w // 14, cy + dy * r + w // 14), fill=WHITE
            )
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=WHITE)
        draw.ellipse((cx - r // 2, cy - r // 2, cx + r // 2, cy + r // 2), fill=STYLE["Settings"].colour)
    elif glyph == "globe":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=WHITE, width=max(2, w // 16))
        draw.line((cx - r, cy, cx + r, cy), fill=WHITE, width=max(2, w // 20))
        draw.line((cx, cy - r, cx, cy + r), fill=WHITE, width=max(2, w // 20))
    elif glyph == "folder":
        draw.rectangle((cx - r, cy - r // 2, cx + r, cy + r), fill=WHITE)
        draw.rectangle((cx - r, cy - r + 1, cx - r // 4, cy - r // 2), fill=WHITE)
    elif glyph == "envelope":
        draw.rectangle((cx - r, cy - r * 2 // 3, cx + r, cy + r * 2 // 3), fill=WHITE)
        draw.line(
            (cx - r, cy - r * 2 // 3, cx, cy + r // 4, cx + r, cy - r * 2 // 3),
            fill=STYLE["Mail"].colour,
            width=max(2, w // 20),
        )
    elif glyph == "note":
        draw.ellipse((cx - r, cy + r // 3, cx, cy + r), fill=WHITE)
        draw.rectangle((cx - max(2, w // 20), cy - r, cx, cy + r * 2 // 3), fill=WHITE)
        draw.rectangle((cx, cy - r, cx + r * 2 // 3, cy - r // 2), fill=WHITE)
    elif glyph == "mountain":
        draw.polygon(((cx - r, cy + r), (cx - r // 4, cy - r // 2), (cx + r // 2, cy + r)), fill=WHITE)
        draw.polygon(((cx, cy + r), (cx + r // 2, cy), (cx + r, cy + r)), fill=WHITE)
    elif glyph == "calendar":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=WHITE)
        draw.rectangle((cx - r, cy - r, cx + r, cy - r // 3), fill=(120, 20, 20))
    elif glyph == "clock":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=WHITE)
        draw.line((cx, cy, cx, cy - r * 2 // 3), fill=BLACK, width=2)
        draw.line((cx, cy, cx + r // 2, cy), fill=BLACK, width=2)
    elif glyph == "pin":
        draw.ellipse((cx - r * 2 // 3, cy - r, cx + r * 2 // 3, cy + r // 3), fill=WHITE)
        draw.polygon(((cx - r // 2, cy), (cx + r // 2, cy), (cx, cy + r)), fill=WHITE)


# --- screen furniture: desktops, windows, phones ---------------------------------------------------------
DESKTOP_SIZE = (640, 400)
PHONE_SIZE = (360, 640)
WALLPAPER = {"Mac": (180, 170, 220), "WIN": (40, 96, 150), "Mobile": (30, 41, 59)}
MAC_MENU_HEIGHT = 22
WIN_TASKBAR_HEIGHT = 34


def desktop(platform: str, app_name: str = "Finder", size: tuple[int, int] = DESKTOP_SIZE) -> Canvas:
    """An empty desktop of `size` pixels: Mac with its menu bar on top, Windows with its taskbar at the bottom."""
    width, height = size
    canvas = Canvas(width, height, WALLPAPER[platform])
    if platform == "Mac":
        canvas.rect((0, 0, width, MAC_MENU_HEIGHT), (236, 236, 240))
        canvas.rect((10, 5, 22, 17), BLACK, radius=3)  # the Apple-menu mark
        canvas.text((32, 11), app_name, size=12, fill=BLACK, anchor="lm")
        x = 40 + canvas.text_width(app_name, 12)
        for item in ("File", "Edit", "View", "Window", "Help"):
            canvas.text((x, 11), item, size=12, fill=TEXT, anchor="lm")
            x += canvas.text_width(item, 12) + 14
        canvas.text((width - 10, 11), "Mon 9:41", size=12, fill=BLACK, anchor="rm")
    else:
        top = height - WIN_TASKBAR_HEIGHT
        canvas.rect((0, top, width, height), (24, 28, 38))
        for dx, dy in ((0, 0), (9, 0), (0, 9), (9, 0 + 9)):  # the four-pane start button
            canvas.rect((12 + dx, top + 8 + dy, 20 + dx, top + 16 + dy), (56, 189, 248))
        canvas.rect((40, top + 7, 200, top + 27), (55, 60, 72), radius=4)
        canvas.text((48, top + 17), "Type here to search", size=11, fill=(170, 170, 180), anchor="lm")
        canvas.text((width - 10, top + 17), "9:41 AM", size=12, fill=WHITE, anchor="rm")
    return canvas


def mac_dock(canvas: Canvas, apps: list[str], icon_size: int = 40) -> list[Widget]:
    """The Mac dock, centred at the bottom, holding `apps` in the given order."""
    gap = 14
    total = len(apps) * icon_size + (len(apps) - 1) * gap
    left = (canvas.width - total) // 2
    top = canvas.height - icon_size - 26
    canvas.rect((left - 12, top - 8, left + total + 12, canvas.height - 4), (235, 235, 245), radius=14)
    return [
        canvas.icon(left + i * (icon_size + gap), top, icon_size, app, caption_colour=BLACK, caption_size=10)
        for i, app in enumerate(apps)
    ]


def window(canvas: Canvas, box: PixelBox, title: str, platform: str, *, menu: bool = False) -> PixelBox:
    """A desktop window frame with its platform's title bar; returns the content rectangle."""
    left, top, right, bottom = box
    canvas.rect((left + 3, top + 3, right + 3, bottom + 3), (60, 60, 70), radius=8)
    canvas.rect(box, WHITE, outline=(120, 120, 130), radius=8 if platform == "Mac" else 0)
    bar = 26
    if platform == "Mac":
        canvas.rect((left + 1, top + 1, right - 1, top + bar), (232, 232, 236), radius=8)
        for i, colour in enumerate(((255, 95, 87), (254, 188, 46), (40, 200, 64))):
            x = left + 14 + i * 18
            canvas.draw.ellipse((x - 6, top + 7, x + 6, top + 19), fill=colour)
        canvas.text(((left + right) // 2, top + 13), title, size=13, fill=BLACK, anchor="mm")
    else:
        canvas.rect((left + 1, top + 1, right - 1, top + bar), (243, 244, 246))
        canvas.text((left + 10, top + 13), title, size=13, fill=BLACK, anchor="lm")
        for i, mark in enumerate(("X", "[]", "_")):
            canvas.text((right - 16 - i * 30, top + 13), mark, size=12, fill=BLACK, anchor="mm")
    content_top = top + bar
    if menu:
        canvas.rect((left + 1, content_top, right - 1, content_top + 22), (250, 250, 252))
        x = left + 10
        for item in ("File", "Edit", "View", "Help"):
            canvas.text((x, content_top + 11), item, size=12, anchor="lm")
            x += canvas.text_width(item, 12) + 16
        content_top += 22
    canvas.draw.line((left + 1, content_top, right - 2, content_top), fill=(210, 210, 216))
    return left + 1, content_top + 1, right - 1, bottom - 1


def phone(
    title: str | None = None, *, header_colour: Colour = (37, 99, 235), back: bool = True
) -> tuple[Canvas, PixelBox]:
    """A phone screen: status bar, optional app header, gesture bar; returns (canvas, content box).

    With `title=None` the screen is the home screen (wallpaper, no header).
    """
    width, height = PHONE_SIZE
    canvas = Canvas(width, height, WALLPAPER["Mobile"] if title is None else WHITE)
    status_fill = WALLPAPER["Mobile"] if title is None else _darker(header_colour, 0.85)
    canvas.rect((0, 0, width, 24), status_fill)
    canvas.text((14, 12), "9:41", size=12, fill=WHITE, anchor="lm")
    canvas.rect((width - 36, 7, width - 12, 17), WHITE, radius=2)
    content_top = 24
    if title is not None:
        canvas.rect((0, 24, width, 72), header_colour)
        if back:
            canvas.text((18, 48), "<", size=20, fill=WHITE, anchor="mm")
        canvas.text((width // 2, 48), title, size=17, fill=_text_colour_on(header_colour), anchor="mm")
        content_top = 72
    canvas.rect(
        (width // 2 - 60, height - 14, width // 2 + 60, height - 9), WHITE if title is None else (60, 60, 70), radius=2
    )
    return canvas, (0, content_top, width, height - 24)
