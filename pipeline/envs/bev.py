"""The car-mounted bird's-eye view (``camera="bev"``) that both backends draw, pixel for pixel alike.

The view is heading-up and fixed to the car, as CARLA-Roach's BEV: the ego sits in the lower part
of the frame and looks :data:`VIEW_AHEAD_M` metres ahead and :data:`VIEW_BEHIND_M` behind; the
frame is as wide as it is tall. When the car turns, the world turns under it, so the direction of
the road ahead is read off the picture, not from a small car sprite. Image right is the car's
right. Grey levels (:data:`OFF_ROAD`, :data:`ROAD`, :data:`LANE_MARKING`, :data:`VEHICLE`) tell
apart what a driver needs: where the road is, its lane lines, and the cars on it (the ego
included).

The embedded backend rasterises its lane graph into this view (``envs/embedded.py``). The CARLA
backend attaches a semantic-segmentation camera looking straight down from above the car
(:func:`carla_camera_placement`) and maps CARLA's semantic tags to the same grey levels
(:func:`semantic_to_gray`), so a dataset's ``image`` means the same on either simulator.
"""

from __future__ import annotations

import math

import numpy as np

VIEW_AHEAD_M = 38.0
VIEW_BEHIND_M = 10.0
VIEW_SIZE_M = VIEW_AHEAD_M + VIEW_BEHIND_M  # the frame is square: 48 m across

# Grey levels, far apart so that a random-shifted, downsampled frame still separates them.
OFF_ROAD = 0
ROAD = 100
LANE_MARKING = 180
VEHICLE = 255

# CARLA 0.9.14+ semantic tags (the red channel of a semantic-segmentation image), see
# https://carla.readthedocs.io/en/0.9.16/ref_sensors/#semantic-segmentation-camera
_CARLA_ROAD_TAGS = (1,)  # Roads
_CARLA_MARKING_TAGS = (24,)  # RoadLine
_CARLA_VEHICLE_TAGS = (12, 13, 14, 15, 16, 17, 18, 19)  # pedestrian, rider, car ... bicycle


def pixels_per_m(size: int) -> float:
    """Scale of a ``size`` x ``size`` frame (1.75 px/m at 84)."""
    return size / VIEW_SIZE_M


def ego_pixel(size: int) -> tuple[float, float]:
    """(row, column) of the ego car's centre in a ``size`` frame, in pixel units (row 0 at the top)."""
    return VIEW_AHEAD_M * pixels_per_m(size), size / 2.0


def ego_frame_grid(size: int, supersample: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Where each (sub)pixel centre lies in the ego frame, in metres: ``forward`` float64
    ``(size * supersample,)`` per row and ``left`` ``(size * supersample,)`` per column."""
    ppm = pixels_per_m(size)
    centres = (np.arange(size * supersample) + 0.5) / supersample
    ego_row, ego_col = ego_pixel(size)
    return (ego_row - centres) / ppm, (ego_col - centres) / ppm


def carla_camera_placement(size: int, fov_deg: float = 90.0) -> tuple[float, float]:
    """``(x_forward_m, height_m)`` of a camera attached to the ego, pitched -90 degrees (looking
    down, image top = the car's forward), whose ground footprint is exactly this view: centred
    between the view's front and back edges and high enough that ``fov_deg`` spans
    :data:`VIEW_SIZE_M` on the ground."""
    x_forward = (VIEW_AHEAD_M - VIEW_BEHIND_M) / 2.0
    height = (VIEW_SIZE_M / 2.0) / math.tan(math.radians(fov_deg) / 2.0)
    return x_forward, height


def _semantic_lut() -> np.ndarray:
    lut = np.full(256, OFF_ROAD, dtype=np.uint8)
    for tags, grey in ((_CARLA_ROAD_TAGS, ROAD), (_CARLA_MARKING_TAGS, LANE_MARKING),
                       (_CARLA_VEHICLE_TAGS, VEHICLE)):
        lut[list(tags)] = grey
    return lut


SEMANTIC_LUT = _semantic_lut()


def semantic_to_gray(tags: np.ndarray) -> np.ndarray:
    """CARLA semantic tags uint8 ``(H, W)`` -> this view's grey levels uint8 ``(H, W)``."""
    return SEMANTIC_LUT[tags]
