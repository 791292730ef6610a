"""TSL UMD 3.1 and 5.0 tally.

``tally.tsl.codec``
    sans-I/O: framing (DLE/STX), parse and build of v3.1 and v5.0 messages,
    the lamp → bus mapping; no asyncio, no clock.
``tally.tsl.transports``
    asyncio: ``TslInput`` (UDP/TCP listener reporting to a ``TallyState``)
    and ``TslOutput`` (UDP send or TCP connect to displays).

Everything is re-exported here, so ``from tally.tsl import TslInput`` works.
"""

from tally.tsl.codec import (
    BROADCAST,
    DEFAULT_LAMPS,
    DEFAULT_V31_TALLIES,
    DLE,
    MAX_V5_PACKET,
    STX,
    V31_MAX_ADDRESS,
    V31_SIZE,
    TallyColour,
    TslV5Message,
    TslV5Packet,
    TslV5StreamDecoder,
    TslV31Message,
    build_v5_packets,
    parse_v5_datagram,
    parse_v31_datagram,
    v5_buses,
    v31_buses,
    wrap_dle_stx,
)
from tally.tsl.transports import TslInput, TslOutput

__all__ = [
    "BROADCAST", "DEFAULT_LAMPS", "DEFAULT_V31_TALLIES", "DLE", "MAX_V5_PACKET", "STX", "V31_MAX_ADDRESS",
    "V31_SIZE", "TallyColour", "TslInput", "TslOutput", "TslV5Message", "TslV5Packet", "TslV5StreamDecoder",
    "TslV31Message", "build_v5_packets", "parse_v5_datagram", "parse_v31_datagram", "v5_buses", "v31_buses",
    "wrap_dle_stx",
]
