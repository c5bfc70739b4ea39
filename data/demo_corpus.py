"""The offline demo corpus: seeded, generated everyday two-person dialogues with a summary and a topic.

    from lora_pipeline.data.demo_corpus import generate
    rows = generate(3000, seed=0)   # [{"dialogue": "#Person1#: ...", "summary": "...", "topic": "..."}, ...]
    lora-pipeline demo-corpus --out runs/demo --n 200 --seed 0

All text is written here (nothing copied from any data set). Each row is built from its own
random stream (`Random(f"{seed}:{i}")`), so `generate(n, s)[:k] == generate(k, s)`. Summaries carry
only facts stated in the dialogue (names, days, times, places, quantities appear there verbatim),
so a model has to read the dialogue to score well; the topic is a short label of the scenario.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from lora_pipeline.data.config import DataConfigError

NAMES = (
    "Maria", "James", "Aisha", "Tom", "Yuki", "Carlos", "Priya", "Ben", "Fatima", "Lucas", "Chloe", "Omar",
    "Hannah", "Diego", "Mei", "Samuel", "Zara", "Ivan", "Nora", "Kwame", "Elena", "Raj", "Sofia", "Daniel",
    "Leila", "Jonas", "Amara", "Peter", "Ingrid", "Mateo", "Grace", "Hiro", "Olivia", "Tariq", "Emma",
    "Felix", "Rosa", "Andrew", "Nadia", "Victor", "Lena", "Marcus", "Ana", "George", "Sara", "Kenji", "Julia",
    "Adam",
)
SURNAMES = (
    "Lopez", "Chen", "Okafor", "Novak", "Patel", "Schmidt", "Tanaka", "Brown", "Rossi", "Haddad", "Kim",
    "Silva", "Murphy", "Larsen", "Kowalski", "Mensah", "Dubois", "Ivanova", "Green", "Moreno",
)
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
NUMBERS = ("two", "three", "four", "five", "six")
CITIES = ("Lyon", "Porto", "Krakow", "Seville", "Bergen", "Utrecht", "Graz", "Bologna", "Ghent", "Malmo")
STREETS = ("Maple Street", "Oak Avenue", "River Road", "Hill Lane", "Station Road", "Park Street")
COLORS = ("blue", "black", "green", "red", "grey", "white")


class _Dialogue:
    """Turns of one dialogue plus helpers that draw from its own random stream."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.turns: list[tuple[int, str]] = []
        self._used: set[str] = set()

    def pick(self, *options):
        return self.rng.choice(options)

    def maybe(self, p: float = 0.5) -> bool:
        return self.rng.random() < p

    def name(self) -> str:
        """A first name not used yet in this dialogue."""
        name = self.rng.choice([n for n in NAMES if n not in self._used])
        self._used.add(name)
        return name

    def surname(self) -> str:
        name = self.rng.choice([n for n in SURNAMES if n not in self._used])
        self._used.add(name)
        return name

    def time(self, first: int = 8, last: int = 19) -> str:
        hour = self.rng.randint(first, last)
        minute = self.rng.choice((0, 0, 15, 30, 45))
        suffix = "am" if hour < 12 else "pm"
        h12 = hour - 12 if hour > 12 else hour
        return f"{h12} {suffix}" if minute == 0 else f"{h12}:{minute:02d} {suffix}"

    def two_days(self) -> tuple[str, str]:
        a, b = self.rng.sample(DAYS, 2)
        return a, b

    def p1(self, *variants: str) -> None:
        self.turns.append((1, self.rng.choice(variants)))

    def p2(self, *variants: str) -> None:
        self.turns.append((2, self.rng.choice(variants)))

    def text(self) -> str:
        return "\n".join(f"#Person{who}#: {line}" for who, line in self.turns)


Scenario = Callable[[_Dialogue], tuple[str, str]]  # fills the turns; returns (summary, topic)


def _appointment(d: _Dialogue) -> tuple[str, str]:
    kind, service, place_word = d.pick(
        ("dentist", "a cleaning", "Dental"), ("dentist", "a check-up", "Dental Care"),
        ("doctor", "a check-up", "Medical Centre"), ("eye test", "an eye test", "Eye Clinic"),
        ("vet", "a vaccination for the dog", "Vet Clinic"), ("hairdresser", "a haircut", "Hair Studio"),
    )
    caller, staff = d.name(), d.name()
    expert = d.name() if kind == "hairdresser" else f"Dr. {d.surname()}"
    clinic = f"{d.surname()} {place_word}"
    day1, day = d.two_days()
    time = d.time(8, 17)
    d.p1(f"Good morning, {clinic}, {staff} speaking.",
         f"Hello, thank you for calling {clinic}. How can I help?")
    d.p2(f"Hi, this is {caller}. I'd like to book {service}, please.",
         f"Hello, my name is {caller}. I need {service} this week if possible.")
    if d.maybe():
        d.p1(f"Let me see. {expert} could see you on {day1} morning.",
             f"We have a free slot on {day1}, {caller}.")
        d.p2(f"{day1} is difficult for me, I'm working. Is there anything else?",
             f"Sorry, I can't make it on {day1}. Do you have another day?")
    d.p1(f"{expert} is free on {day} at {time}. Would that suit you?",
         f"How about {day} at {time} with {expert}?")
    d.p2(f"Yes, {day} at {time} is perfect.", "That works for me, thank you.", "Great, I'll take it.")
    if d.maybe():
        d.p1("Please come ten minutes early to fill in a short form.", "Don't forget to bring your card.")
        d.p2("Sure, no problem.", "Will do. Thanks a lot.")
    d.p1(f"You're booked in, {caller}. See you then.", "All set. Have a nice day.")
    summary = d.pick(
        f"{caller} books {service} with {expert} at {clinic} for {day} at {time}.",
        f"{caller} calls {clinic} and gets {service} with {expert} on {day} at {time}.",
    )
    return summary, f"{kind} appointment"


def _shopping(d: _Dialogue) -> tuple[str, str]:
    item, plural, sizes = d.pick(
        ("shirt", "shirts", ("small", "medium", "large")), ("jacket", "jackets", ("medium", "large")),
        ("pair of socks", "pairs of socks", ("small", "large")), ("mug", "mugs", ("large",)),
        ("towel", "towels", ("large", "small")), ("cap", "caps", ("small", "large")),
    )
    buyer, clerk = d.name(), d.name()
    color, size = d.pick(*COLORS), d.pick(*sizes)
    qty_i = d.rng.randint(2, 6)
    qty, unit = NUMBERS[qty_i - 2], d.rng.randint(4, 30)
    total = qty_i * unit
    d.p1("Hi there, can I help you find anything?", f"Good afternoon, I'm {clerk}. Looking for something?")
    d.p2(f"Yes, I'm looking for a {color} {item}.", f"I need a {item}, ideally {color}.")
    d.p1(f"These {color} ones are {unit} dollars each. Which size?", f"We have {color} ones here. What size?")
    d.p2(f"{size.capitalize()}, please. Actually, I'll take {qty} of them.",
         f"A {size} one. Could I get {qty}? They're for the whole family.")
    if d.maybe(0.4):
        d.p1("Would you like a gift bag as well?", "Do you want to try one on first?")
        d.p2("No thanks, that's fine.", "Not today, thanks.")
    d.p1(f"That comes to {total} dollars. Can I have a name for the receipt?",
         f"{qty.capitalize()} {plural}, {total} dollars in total. And your name for the points card?")
    d.p2(f"It's {buyer}. I'll pay by card.", f"{buyer}. Here you go, cash is fine?")
    d.p1(f"Thank you, {buyer}. Enjoy your {plural}!", f"Perfect, {buyer}. Have a good day.")
    summary = d.pick(
        f"{buyer} buys {qty} {color} {plural} in size {size} for {total} dollars.",
        f"{buyer} pays {total} dollars for {qty} {size} {color} {plural}.",
    )
    return summary, f"buying {plural}"


def _travel(d: _Dialogue) -> tuple[str, str]:
    mode, stop = d.pick(("train", "platform"), ("bus", "bay"), ("ferry", "pier"))
    traveller, agent = d.name(), d.name()
    city, day, time = d.pick(*CITIES), d.pick(*DAYS), d.time(6, 20)
    qty, stop_no = d.pick(*NUMBERS[:3]), d.rng.randint(1, 12)
    d.p1(f"Hello, I'd like {qty} {mode} tickets to {city}, please.",
         f"Hi, can I buy {qty} tickets for the {mode} to {city}?")
    d.p2("Of course. For which day?", f"Sure. I'm {agent}, I can help. When do you want to travel?")
    d.p1(f"This {day}, please.", f"On {day}. What times do you have?")
    d.p2(f"There is one at {time} from {stop} {stop_no}.", f"The {mode} leaves at {time}, {stop} {stop_no}.")
    if d.maybe():
        d.p1("Is it direct?", "How long does it take?")
        d.p2("Yes, no changes.", "About three hours.", "Yes, and it's usually on time.")
    d.p1(f"Great, I'll take them. The name is {traveller}.", f"Perfect. They're under {traveller}.")
    d.p2(f"Here are your tickets, {traveller}. Have a good trip!", "Done. Enjoy your trip.")
    summary = d.pick(
        f"{traveller} buys {qty} {mode} tickets to {city}; the {mode} leaves on {day} at {time} "
        f"from {stop} {stop_no}.",
        f"{traveller} will take the {time} {mode} to {city} on {day} from {stop} {stop_no} "
        f"with {qty} tickets.",
    )
    return summary, f"{mode} tickets"


def _work(d: _Dialogue) -> tuple[str, str]:
    a, b = d.name(), d.name()
    subject = d.pick("the budget report", "the website redesign", "the new hire plan", "the client proposal",
                     "the sales figures", "the office move")
    day, time, room = d.pick(*DAYS[:5]), d.time(9, 17), d.rng.randint(2, 40)
    task = d.pick("the slides", "the figures", "a short agenda", "the draft", "the contracts")
    d.p1(f"{b}, do you have a minute? We need to talk about {subject}.",
         f"Hi {b}, can we meet about {subject} this week?")
    d.p2(f"Sure, {a}. When suits you?", f"Of course, {a}. What day works for you?")
    d.p1(f"How about {day} at {time}?", f"Is {day} at {time} okay?")
    if d.maybe():
        other = d.pick(*[x for x in DAYS[:5] if x != day])
        d.p2(f"I'm in training all day on {other}, but {day} is fine.", f"{day} is fine. Not {other} though.")
    else:
        d.p2(f"{day} at {time} works.", "That's fine with me.")
    d.p1(f"Great. Let's use room {room}. Could you bring {task}?",
         f"I'll book room {room}. Can you prepare {task}?")
    d.p2(f"Yes, I'll have {task} ready.", f"No problem, I'll bring {task}.")
    summary = d.pick(
        f"{a} and {b} will meet on {day} at {time} in room {room} about {subject}; {b} will bring {task}.",
        f"{a} sets a meeting with {b} on {day} at {time} in room {room}; {b} prepares {task}.",
    )
    return summary, "meeting planning"


def _repair(d: _Dialogue) -> tuple[str, str]:
    item, problem = d.pick(
        ("laptop", "the screen is cracked"), ("laptop", "it won't turn on"),
        ("phone", "the battery dies fast"), ("phone", "the speaker is broken"),
        ("bicycle", "the brakes squeak"), ("printer", "it keeps jamming"),
        ("coffee machine", "it leaks water"), ("washing machine", "it doesn't drain"),
    )
    owner, tech = d.name(), d.name()
    cost, day = d.rng.randint(3, 30) * 5, d.pick(*DAYS)
    d.p1(f"Hello, I'm {owner}. My {item} needs fixing, {problem}.",
         f"Hi, I'm {owner}. Can you help me? My {item} is broken: {problem}.")
    d.p2(f"Let me have a look. I'm {tech}.", f"Sure. I'm {tech}, I do the repairs here. May I see it?")
    if d.maybe():
        d.p1("Is it worth repairing?", "Is it a big job?")
        d.p2("It's a common problem, don't worry.", "No, this one is easy to fix.")
    d.p1("So what do you think?", "How much will it be, and when?", "Can you do it this week?")
    d.p2(f"I can repair it for {cost} dollars. It'll be ready on {day}.",
         f"It will cost {cost} dollars and you can pick it up on {day}.")
    d.p1(f"{cost} dollars is fine. {day} then.", "Okay, please go ahead.", f"Fine, I'll come back on {day}.")
    summary = d.pick(
        f"{owner}'s {item} is broken because {problem}; {tech} will fix it for {cost} dollars by {day}.",
        f"{tech} will repair {owner}'s {item} for {cost} dollars; it will be ready on {day}.",
    )
    return summary, f"{item} repair"


def _restaurant(d: _Dialogue) -> tuple[str, str]:
    guest, host = d.name(), d.name()
    place = f"The {d.pick('Golden', 'Blue', 'Little', 'Old')} {d.pick('Fork', 'Lantern', 'Olive', 'Mill')}"
    size, day, time = d.pick(*NUMBERS), d.pick(*DAYS), d.time(12, 21)
    wish = d.pick("a window table", "a high chair", "a quiet corner", "a table outside", "a birthday cake")
    d.p1(f"Good evening, {place}, this is {host}.", f"{place}, how can I help you?")
    d.p2(f"Hi, I'd like to book a table for {size} on {day}.",
         f"Hello, do you have a table for {size} on {day}?")
    d.p1("What time would you like?", f"Let me check {day}. What time?")
    d.p2(f"Around {time}, please.", f"{time}, if you can.")
    d.p1(f"{time} is available. May I have your name?", "Yes, we can do that. Under what name?")
    d.p2(f"{guest}. And could we have {wish}?", f"It's {guest}. Oh, and we'd like {wish}, please.")
    d.p1(f"Of course, {guest}. See you on {day}.", f"No problem, I've noted {wish}.")
    summary = d.pick(
        f"{guest} books a table for {size} at {place} on {day} at {time} and asks for {wish}.",
        f"{guest} reserves a table for {size} at {place} for {day} at {time}, with {wish}.",
    )
    return summary, "restaurant reservation"


def _hotel(d: _Dialogue) -> tuple[str, str]:
    guest, clerk = d.name(), d.name()
    hotel = f"{d.pick('Harbor', 'Garden', 'Central', 'Lakeside', 'Park')} Hotel"
    nights, day = d.pick(*NUMBERS[:4]), d.pick(*DAYS)
    room = d.pick("single", "double", "twin", "family")
    extra = d.pick("breakfast", "parking", "a late checkout", "a sea view")
    d.p1(f"Hello, is this the {hotel}? I'd like to book a room.",
         f"Hi, I want to reserve a room at the {hotel}.")
    d.p2(f"Yes, you're speaking to {clerk}. For how many nights?", "Certainly. How many nights?")
    d.p1(f"{nights.capitalize()} nights, from {day}.", f"From {day}, for {nights} nights.")
    d.p2(f"We have a {room} room free. Anything else?", f"A {room} room is available. Any requests?")
    d.p1(f"Yes, I'd like {extra} included.", f"Could you add {extra}?")
    d.p2("Done. Your name, please?", f"Sure, {extra} is added. What's the name?")
    d.p1(f"{guest}.", f"It's {guest}, thank you.")
    summary = d.pick(
        f"{guest} books a {room} room at the {hotel} for {nights} nights from {day} with {extra}.",
        f"{guest} reserves {nights} nights in a {room} room at the {hotel} from {day}, adding {extra}.",
    )
    return summary, "hotel booking"


def _apartment(d: _Dialogue) -> tuple[str, str]:
    renter, owner = d.name(), d.name()
    street, rooms = d.pick(*STREETS), d.pick("one-bedroom", "two-bedroom", "studio")
    rent, day, time = d.rng.randint(12, 30) * 50, d.pick(*DAYS), d.time(9, 18)
    d.p1(f"Hello, is that {owner}? I'm calling about the {rooms} flat on {street}.",
         f"Hi {owner}, I saw your ad for the {rooms} flat on {street}.")
    d.p2(f"Yes, it's still free. The rent is {rent} dollars a month.",
         f"It's available. It costs {rent} dollars a month.")
    if d.maybe():
        d.p1("Are pets allowed?", "Is heating included?")
        d.p2("Yes, that's fine.", "No, that's extra, I'm afraid.")
    d.p1("Could I come and see it?", "When could I have a look?")
    d.p2(f"How about {day} at {time}?", f"I'm there on {day} at {time}.")
    d.p1(f"Perfect. My name is {renter}. See you on {day}.",
         f"{day} at {time} is good. I'm {renter}, by the way.")
    summary = d.pick(
        f"{renter} will see {owner}'s {rooms} flat on {street} on {day} at {time}; rent is {rent} dollars.",
        f"{renter} arranges to view the {rooms} flat on {street} with {owner} on {day} at {time}.",
    )
    return summary, "apartment viewing"


def _plans(d: _Dialogue) -> tuple[str, str]:
    a, b = d.name(), d.name()
    what, where = d.pick(
        ("a movie", "the cinema"), ("a concert", "the park"), ("a food festival", "the market"),
        ("a football match", "the stadium"), ("an exhibition", "the city museum"),
    )
    day, time = d.pick(*DAYS), d.time(10, 20)
    meet = d.pick("the bus stop", "the main entrance", "the bakery", "the station")
    d.p1(f"Hey {b}, are you free on {day}?", f"{b}! Any plans for {day}?")
    d.p2(f"Not really, {a}. Why?", f"Nothing yet, {a}. What's up?")
    d.p1(f"Do you want to go to {what} at {where}?", f"There's {what} at {where}. Want to come?")
    d.p2("Sounds great! What time?", "I'd love to. When does it start?")
    d.p1(f"Let's meet at {time} at {meet}.", f"Meet me at {meet} at {time}?")
    d.p2(f"Okay, {time} at {meet}. See you!", "Deal. Don't be late!")
    summary = d.pick(
        f"{a} and {b} will go to {what} at {where} on {day}; they meet at {meet} at {time}.",
        f"{a} invites {b} to {what} at {where} on {day}, meeting at {meet} at {time}.",
    )
    return summary, "weekend plans" if day in ("Saturday", "Sunday") else "meeting a friend"


SCENARIOS: dict[str, Scenario] = {
    "appointment": _appointment, "shopping": _shopping, "travel": _travel, "work": _work, "repair": _repair,
    "restaurant": _restaurant, "hotel": _hotel, "apartment": _apartment, "plans": _plans,
}


def generate_one(seed: int, index: int) -> dict[str, str]:
    """Row `index` of the corpus with `seed`: its own random stream, so rows are independent."""
    rng = random.Random(f"{seed}:{index}")
    family = rng.choice(sorted(SCENARIOS))
    d = _Dialogue(rng)
    summary, topic = SCENARIOS[family](d)
    return {"dialogue": d.text(), "summary": summary, "topic": topic}


def generate(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` rows with keys `dialogue`, `summary`, `topic`; same (n, seed) gives the same rows."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise DataConfigError(f"demo corpus size n must be an integer >= 0, got {n!r}")
    return [generate_one(seed, i) for i in range(n)]
