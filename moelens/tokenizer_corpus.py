"""The fixed English text the built-in tokenizer is trained on.

Changing a single character changes the tokenizer and therefore every synthetic model built
from it: bump `DEFAULT_MODEL_VERSION` in `moelens/default_model.py` when editing this text.
"""

CORPUS = """\
The morning was cold and clear, and the river ran fast under the old stone bridge. A few
people walked along the path with their dogs, and a man sold hot coffee from a small cart
near the station. Children were on their way to school, talking about the game they had
played the day before and the test they would write in the afternoon.

In the kitchen, my grandmother kept a book of recipes that she had collected over fifty
years. Some were written in pencil on the backs of letters, others were cut from newspapers
and glued onto the pages. Her favourite was a simple bread: flour, water, salt and a little
yeast, mixed in the evening and left to rise through the night. In the morning she would
shape the dough, let it rest for an hour, and bake it in a very hot oven until the crust was
dark brown and sang as it cooled.

A computer is a machine that follows instructions. The instructions are stored in memory as
numbers, and the processor reads them one after another, adding, comparing and moving data
from one place to another. Modern processors can do billions of these small steps every
second. They keep the most recent data in a cache, because reading from main memory takes
far longer than a simple addition. Good programs are written so that the data they need next
is already close at hand.

Large language models predict the next word of a text. They read a sequence of tokens, which
are pieces of words, and compute a probability for every token in their vocabulary. A model
with a mixture of experts has many small feed forward networks in each layer, and a router
chooses only a few of them for each token. This makes the model large in total but cheap to
run for every single token, as long as the weights can be moved to where they are needed.

The history of the city begins with a small market town on the bank of the river. Farmers
brought grain, wool and cheese to sell, and merchants came from the coast with salt, cloth
and iron tools. Over the centuries the town grew, walls were built and later torn down, and
the narrow streets of the old centre were joined by wide avenues, parks and railway lines.
Today more than a million people live there, and the market still opens every Saturday.

Science is a way of asking questions about the world and checking the answers carefully. A
scientist makes a guess, designs an experiment to test it, and measures what happens. If
the result does not match the guess, the guess must change. Over time, ideas that survive
many tests become theories that explain a great deal: why the planets move as they do, how
heat flows from warm things to cold ones, and how living cells copy themselves.

Once upon a time there was a fox who lived at the edge of a forest. Every evening she
watched the lights of the village and wondered what the people did inside their houses. One
night she crept to a window and saw a family sitting at a table, sharing soup and telling
stories. She listened until the candles burned low, and then she ran home through the dark
trees, thinking that stories might be the warmest thing in the world.

Please write a short letter to your friend and tell her about your holiday. Where did you go,
what did you see, and what was the weather like? Did you eat anything new? What would you
like to do next summer? Remember to ask how she is and to thank her for the book she sent.

The weather today will be mostly sunny, with a light wind from the west and a high of twenty
one degrees. Clouds will build in the evening, and there is a chance of rain after midnight.
Tomorrow will be cooler and wet, so take an umbrella if you are going out early.

Mathematics studies numbers, shapes and patterns. Two plus two is four, three times seven is
twenty one, and the square of nine is eighty one. A triangle has three sides and its angles
add up to one hundred and eighty degrees. A prime number can only be divided by one and by
itself: two, three, five, seven, eleven, thirteen and so on, without end.

Question: What is the capital of France? Answer: The capital of France is Paris.
Question: How many days are there in a week? Answer: There are seven days in a week.
Question: Why is the sky blue? Answer: Sunlight is scattered by the air, and blue light is
scattered more than red light, so the sky looks blue when we look away from the sun.

The train leaves at half past eight from platform four. Passengers should have their tickets
ready and keep their bags with them at all times. The journey takes about two hours, with
stops at three small towns, and a trolley with drinks and sandwiches will pass through the
carriages shortly after departure. We hope you enjoy your trip.

Music can change the mood of a room in a moment. A slow song played on a piano makes people
quiet and thoughtful, while a fast rhythm on the drums makes them want to dance. Many people
learn to play an instrument as children, practising scales for hours, and only later find
the joy of playing with other musicians in a band or an orchestra.

Water boils at one hundred degrees at sea level, but at a lower temperature high in the
mountains, where the air pressure is lower. This is why cooking pasta takes longer at the
top of a mountain. Ice floats because it is less dense than liquid water, which protects
fish and plants in lakes through the long winter months.

The meeting is on Monday at ten in the small room on the second floor. We will look at the
results of the last quarter, plan the work for the next three months, and decide who will
lead the new project. Please read the report before you come, and bring any questions you
have. Coffee and tea will be served.

She opened the door, looked at the empty street, and smiled. After all these years, she was
home again. The garden had grown wild, the paint on the fence was peeling, and the old apple
tree had fallen in a storm, but the house was still standing, and the key still turned in
the lock. She put down her bags, opened every window, and let the spring air fill the rooms.
"""
