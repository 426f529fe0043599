"""Out-of-domain text for the synthetic corpus's ``ood`` split (text no one here tuned to).

``PROSE``: 314 distinct English sentences of real prose from 14 public-domain works (19th-century
fiction, fables, fairy tales, a 1684 translation of More's Utopia, and three US presidential
inaugural addresses, which are US government texts). Verbatim from Project Gutenberg etexts (found
as plain text in public GitHub repositories; repository and file noted per block), except that a
word printed in small capitals at the start of a paragraph is written in ordinary capitalisation
("WOLF, meeting" -> "Wolf, meeting"). Each: 5 to 20 words, plain ASCII, no quotation marks, no
digits, no abbreviations (Mr., St., initials), no archaic hyphenations (to-day) that would score as
two words; chosen by tools/extract_prose.py (stable hash order) and reviewed by hand.
``PROSE_SOURCE[i]`` names the work of ``PROSE[i]``.

``numbers_and_names(seed, n)``: ``n`` distinct deterministic sentences with numbers, dates, times,
money, percentages, phone numbers and personal/place names, all written as words, using no name
of the training grammar (Anna Peter Maria John Clara Thomas Lucy Henry Emma Oliver Sarah Daniel
Grace Martin Helen).
"""

from __future__ import annotations

import random

_BLOCKS: list[tuple[str, list[str]]] = [
    # Aesop's Fables, tr. George Fyler Townsend (1867)
    # text: github.com/Rickisteiner/BooksDesign aesop.txt
    ("Aesop's Fables, tr. George Fyler Townsend (1867)", [
        'A Boy was hunting for locusts.',
        'Fair weather friends are not worth much.',
        'Encased in the skin of a sheep, he pastured with the flock deceiving the shepherd by his costume.',
        'The Traveler asserted that he had, with the hire of the Ass, hired his Shadow also.',
        'Jupiter, after warning him that he would repent his request, caused him to be sold to a tile-maker.',
        'Pray spare my life, and put me back into the sea.',
        "When the pool dried up under the summer's heat, they left it and set out together for another home.",
        'A Bull, escaping from a Lion, hid in a cave which some shepherds had recently occupied.',
        'Then he requested the Fox to do him the favor to make a division.',
        'Misfortunes springing from ourselves are the hardest to bear.',
        'So desiring two ends, he obtained neither.',
        'The Partridges declared that they would dig around his vines and make them produce finer grapes.',
        'Two Men, deadly enemies to each other, were sailing in the same vessel.',
        'The shepherd, seeing what had happened, ran up and caught him.',
        'Momus, however, being very envious of the handicraft of each, found fault with all.',
        'How I have deceived myself!',
        "Hence she obtained her crest, which is popularly said to be her father's grave-hillock.",
        "Youth's first duty is reverence to parents.",
        'Each undertook his proper duty in accordance with his own nature and powers.',
        'A Fox was mounting a hedge when he lost his footing and caught hold of a Bramble to save himself.',
        'The safeguards of virtue are hateful to those with evil intentions.',
        'I do not often get such a chance as this.',
        'Many are obtained from ancient authors prior to the time in which he lived.',
        'Little is known of his history.',
    ]),
    # Lewis Carroll, Alice's Adventures in Wonderland (1865)
    # text: github.com/lpodol/books aliceInWonderland.txt
    ("Lewis Carroll, Alice's Adventures in Wonderland (1865)", [
        'I wish you were down here with me!',
        'Oh, how I wish I could shut up like a telescope!',
        'So she set to work, and very soon finished off the cake.',
        'And yesterday things went on just as usual.',
        'I almost think I can remember feeling a little different.',
        "However, the Multiplication Table doesn't signify: let's try Geography.",
        'I must have been changed for Mabel!',
        'This is the driest thing I know.',
        "And she's such a capital one for catching mice you can't think!",
        'And oh, I wish you could see her after the birds!',
        'Do you think I can listen all day to such stuff?',
        'The Caterpillar was the first to speak.',
        'Alice went timidly up to the door, and knocked.',
        'While she was looking at the place where it had been, it suddenly appeared again.',
        'So she went in search of her hedgehog.',
        'However, she did not like to be rude, so she bore it as well as she could.',
        'So they sat down, and nobody spoke for some minutes.',
        'Would not, could not, would not, could not, could not join the dance.',
        'So they got thrown out to sea.',
        "So they couldn't get them out again.",
        'So Alice began telling them her adventures from the time when she first saw the White Rabbit.',
        'One of the jurors had a pencil that squeaked.',
        'Here the Queen put on her spectacles, and began staring at the Hatter, who turned pale and fidgeted.',
        'Here the other guinea-pig cheered, and was suppressed.',
    ]),
    # Hans Christian Andersen, Fairy Tales (19th-century English translation, Gutenberg)
    # text: github.com/lpodol/books andersen.txt
    ('Hans Christian Andersen, Fairy Tales (19th-century English translation, Gutenberg)', [
        'Time passed merrily in the large town which was his capital; strangers arrived every day at the court.',
        'The Prince accordingly made her his wife; being now convinced that he had found a real Princess.',
        'Nature seems anew to celebrate her awakening into life.',
        'His thoughts were so elastic, his heart so tender; and involuntarily he picked one of the nearest flowers.',
        'Can a dog, or a horse laugh?',
        'Oh, that made him so angry!',
        'Oh! were I but already on the cart!',
        'Their parents lived exactly opposite.',
        'Oh! is little Kay really dead?',
        'We have seen little Kay!',
        'And when they reached the bush with the red berries, they found the Reindeer waiting for them.',
        'The cover rose more and more; and the Elder-flowers came forth so fresh and white, and shot up long branches.',
        'It was so thick, and the foliage so dense, that it was quite fatiguing to proceed.',
        "The King's Son often stood still and listened.",
        "And then they entered a chamber where the walls were covered with hog's leather, and printed with gold flowers.",
        'He will get nothing but a grave!',
        'Tell me something about little Mary!',
        'Where shall we get a wife for him?',
        'They were so afraid of me, and yet they were so excessively fond of me.',
        'And so I became the man I am.',
        'But little Tuk was no longer lying down: all at once he was on horseback.',
        'It seemed to him just as if one turned over a leaf in a book.',
        'He looked exactly like a little angel, but he was so pale, and his whole body trembled with cold.',
        'But there was a great ball in the city, to which Karen was invited.',
    ]),
    # Mary Shelley, Frankenstein (1818 text)
    # text: github.com/Rickisteiner/BooksDesign franknstein.txt
    ('Mary Shelley, Frankenstein (1818 text)', [
        'Yet some feelings, unallied to the dross of human nature, beat even in these rugged bosoms.',
        'It was my temper to avoid a crowd, and to attach myself fervently to a few.',
        'I read with ardour those works, so full of genius and discrimination, which modern inquirers have written on these subjects.',
        'She was very earnest to see the corpse.',
        'How altered everything might be during that time!',
        'But do not mourn, dear girl.',
        'I tried, therefore, to dress my food in the same manner, placing it on the live embers.',
        'I did not yet entirely know the fatal effects of this miserable deformity.',
        'The news reached Felix, and roused him from his dream of pleasure.',
        'Why did you form a monster so hideous that even you turned from me in disgust?',
        'I dared not think that they would turn them from me with disdain and horror.',
        'That hour passed, the sun mounted high in the heavens, but the cottagers did not appear.',
        'Thus would she assuredly act, if her darkened eyes opened and she beheld me.',
        'My companion must be of the same species, and have the same defects.',
        'On the whole island there were but three miserable huts, and one of these was vacant when I arrived.',
        'Every moment I feared to meet my persecutor.',
        'After having landed, they proceeded to search the country, parties going in different directions among the woods and vines.',
        'What then became of me?',
        'My Present situation was one in which all voluntary thought was swallowed up and lost.',
        'But again the frost came and made the paths of the sea secure.',
        'I hoped to induce you to grant me a boat with which I could pursue my enemy.',
        'The cold is excessive, and many of my unfortunate comrades have already found a grave amidst this scene of desolation.',
        'A frightful selfishness hurried me on, while my heart was poisoned with remorse.',
        'Why do you not hate Felix who drove his friend from his door with contumely?',
    ]),
    # Rudyard Kipling, The Jungle Book (1894)
    # text: github.com/lpodol/books jungle.txt
    ('Rudyard Kipling, The Jungle Book (1894)', [
        'What talk is this of choosing?',
        'Let him run with the Pack.',
        'Where is the bull, Bagheera?',
        'He grew up with the cubs, though they, of course, were grown wolves almost before he was a child.',
        'That will at least save the Pack three lives.',
        'The Monkey-People, watching in the trees, considered his play most wonderful.',
        'Twenty or thirty monkeys bounded away to bring him nuts and wild pawpaws.',
        'We are the most wonderful people in all the jungle!',
        'Mowgli was uneasy, because he had never been under a roof before.',
        'These buffaloes will not charge unless they wind him, and I cannot speak their language.',
        'He was dead, and the kites were coming for him already.',
        'I did not know that thou wast anything more than a herdsboy.',
        "Let us get Shere Khan's skin and go away.",
        'When ye are full-fed, the madness may come upon you again.',
        'At the end of six months what Kotick did not know about deep-sea fishing was not worth the knowing.',
        'A hot wind knocked him senseless and red fire singed his fur.',
        'Else why should he go hunting these wild devils?',
        'Go and wash Kala Nag and attend to his ears, and see that there are no thorns in his feet.',
        'How many windings has the Dihang River?',
        'There was no tune and no words, but the thumping made him happy.',
        'Now he understood the trampling.',
        'He shall follow the new trail, and the stale trail, and the mixed trail, with a clear eye!',
        "But it's different with me.",
        "I'm going to look at this man.",
    ]),
    # Herman Melville, Moby-Dick (1851)
    # text: github.com/Rickisteiner/BooksDesign moby.txt
    ('Herman Melville, Moby-Dick (1851)', [
        'But New Bedford beats all Water Street and Wapping.',
        'Can Herr Alexander perform a feat like that?',
        'He rings every coin to find a counterfeit.',
        'But observe his prayer, and learn a weighty lesson.',
        'To preach the Truth to the face of Falsehood!',
        'He has a great pack on him like a peddler; or you might call him the Elephant and Castle whale.',
        'It was during the more pleasant weather, that in due rotation with the other seamen my first mast-head came round.',
        'In a strait-jacket, he swung to the mad rockings of the gales.',
        'But how had the mystic thing been caught?',
        'In the short gam that ensued she gave us strong news of Moby Dick.',
        'But I must be content with a hint.',
        "But the monster's run was a brief one.",
        'But others are by no means so scrupulous.',
        "What to the rapacious landlord is the widow's last mite but a Fast-Fish?",
        'This is the invariable cry from the mates to the mincer.',
        'There is a wisdom that is woe; but there is a woe that is madness.',
        'Oh! my friends, but this is man-killing!',
        "Aye, here on the coin he's just crossing the threshold between two of twelve sitting-rooms all in a ring.",
        'Cook! ho, cook! and cook us!',
        "I'll soon take that black from your brow.",
        'But thou art but my fiery father; my sweet mother, I know not.',
        'The grey-headed woodpecker tapping the hollow tree!',
        'Stubb no more strove to raise a smile; Starbuck no more strove to check one.',
        'Here, brush this old hair aside; it blinds me, that I seem to weep.',
    ]),
    # Mark Twain, The Adventures of Tom Sawyer (1876)
    # text: github.com/Rickisteiner/BooksDesign sawyer.txt
    ('Mark Twain, The Adventures of Tom Sawyer (1876)', [
        'But neither could get an advantage.',
        'The locust-trees were in bloom and the fragrance of the blossoms filled the air.',
        'But his face lit up, right away, for she tossed a pansy over the fence a moment before she disappeared.',
        'Then he thought of his flower.',
        'Tom eyed it, and longed for it; but it was safe out of his reach.',
        'It was a genuine relief to the whole congregation when the ordeal was over and the benediction pronounced.',
        'The temptation was too strong.',
        'He would have tossed and fidgeted, as his nerves demanded, but he was afraid he might wake Sid.',
        'The Black Avenger of the Spanish Main said it would never do to start without some fire.',
        'The other pirates envied him this majestic vice, and secretly resolved to acquire it shortly.',
        'Then conscience granted a truce, and these curiously inconsistent pirates fell peacefully to sleep.',
        'They fried the fish with the bacon, and were astonished; for no fish had ever seemed so delicious before.',
        'They found plenty of things to be delighted with, but nothing to be astonished at.',
        'But Tom was uneasy, nevertheless, and was alarmed to see Joe go sullenly on with his dressing.',
        'Joe caught at the idea and said he would like to try, too.',
        'Both boys were looking very pale and miserable, now.',
        'Only the biggest boys, and young ladies of eighteen and twenty, escaped lashing.',
        'The audience listened breathless, but the words refused to come.',
        'His comrade stirred him once or twice and he became quiet.',
        'His breath stopped and he listened.',
        'Becky understood, and her hope died again.',
        'They were covered with clay and candle-grease.',
        "Maybe you don't believe it, but he's got lots of it.",
        'He said that no commonplace boy would ever have got his daughter out of the cave.',
    ]),
    # Nathaniel Hawthorne, The Scarlet Letter (1850)
    # text: github.com/Rickisteiner/BooksDesign scarlet.txt
    ('Nathaniel Hawthorne, The Scarlet Letter (1850)', [
        'The discovery was soon made, I imagine, that the new Surveyor had no great harm in him.',
        'And yet it strangely interested me.',
        'Or I might readily have found a more serious task.',
        'They were, doubtless, good men, just and sage.',
        'In this state, the voice of the preacher thundered remorselessly, but unavailingly, upon her ears.',
        'My heart was a habitation large enough for many guests, but lonely and chill, and without a household fire.',
        'There are none in this land that know me.',
        'The child could not be made amenable to rules.',
        'Skilful men, of the medical and chirurgical profession, were of rare occurrence in the colony.',
        'Alas, for his own soul, if these were what he sought!',
        'After a brief pause, the physician turned away.',
        "They fancied him the mouth-piece of Heaven's messages of wisdom, and rebuke, and love.",
        'She had climbed her way since then to a higher point.',
        'If not for his sake, then doubly for thine own!',
        'He sank down on the ground, and buried his face in his hands.',
        'Roger Chillingworth knows your purpose to reveal his true character.',
        'A crimson flush was glowing on her cheek, that had been long so pale.',
        'She is a strange child!',
        'And the infectious poison of that sin had been thus rapidly diffused throughout his moral system.',
        'What imagination would have been irreverent enough to surmise that the same scorching stigma was on them both!',
        'Never, from the soil of New England had gone up such a shout!',
        'The crowd, meanwhile, looked on with awe and wonder.',
        'Thou lookest far into eternity, with those bright dying eyes!',
        'And Hester Prynne had returned, and taken up her long-forsaken shame!',
    ]),
    # Washington Irving, The Legend of Sleepy Hollow (1820)
    # text: github.com/Rickisteiner/BooksDesign sleepy.txt
    ('Washington Irving, The Legend of Sleepy Hollow (1820)', [
        'The cognomen of Crane was not inapplicable to his person.',
        'Indeed, it behooved him to keep on good terms with his pupils.',
        'What fearful shapes and shadows beset his path, amidst the dim and ghastly glare of a snowy night!',
        'Old Baltus Van Tassel was a perfect picture of a thriving, contented, liberal-hearted farmer.',
        'All was now bustle and hubbub in the late quiet schoolroom.',
        'A few amber clouds floated in the sky, without a breath of air to move them.',
        'Such heaped up platters of cakes of various and almost indescribable kinds, known only to experienced Dutch housewives!',
        'Ichabod prided himself upon his dancing as much as upon his vocal powers.',
        'But all these were nothing to the tales of ghosts and apparitions that succeeded.',
        'The neighborhood is rich in legendary treasures of the kind.',
        'The revel now gradually broke up.',
        'What passed at this interview I will not pretend to say, for in fact I do not know.',
        'Could that girl have been playing off any of her coquettish tricks?',
        'Was her encouragement of the poor pedagogue all a mere sham to secure her conquest of his rival?',
        'Heaven only knows, not I!',
        'All the stories of ghosts and goblins that he had heard in the afternoon now came crowding upon his recollection.',
        'What was to be done?',
        'It was soon fearfully accounted for.',
        'An opening, in the trees now cheered him with the hopes that the church bridge was at hand.',
        'The wavering reflection of a silver star in the bosom of the brook told him that he was not mistaken.',
        'He saw the walls of the church dimly glaring under the trees beyond.',
        'Ichabod did not make his appearance at breakfast; dinner-hour came, but no Ichabod.',
        'The boys assembled at the schoolhouse, and strolled idly about the banks of the brook; but no schoolmaster.',
        'An inquiry was set on foot, and after diligent investigation they came upon his traces.',
    ]),
    # H. G. Wells, The Time Machine (1895)
    # text: github.com/Rickisteiner/BooksDesign timemachine.txt
    ('H. G. Wells, The Time Machine (1895)', [
        'Then he came into the room.',
        'The Silent Man seemed even more clumsy than usual, and drank champagne with regularity and determination out of sheer nervousness.',
        "I'm nearly worn out, but I shan't sleep till I've told this thing over to you.",
        'An eddying murmur filled my ears, and a strange, dumb confusedness descended on my mind.',
        'He came a step forward, hesitated, and then touched my hand.',
        'The ideal of preventive medicine was attained.',
        'My breath came with pain.',
        'I lit a match and went on past the dusty curtains, of which I have told you.',
        'I saw a crowd of them upon the slopes, looking furtively at me.',
        'I thought it was mere childish affection that made her cling to me.',
        "After an instant's pause I followed it into the second heap of ruins.",
        'A sudden thought came to me.',
        'About London, for instance, perhaps half the prettier country is shut in against intrusion.',
        'It was not too soon.',
        'I had the greatest difficulty in keeping my hold.',
        'It was the darkness of the new moon.',
        'They had long since dropped to pieces, and every semblance of print had left them.',
        'Very eagerly I tried them.',
        'Very soon I had a choking smoky fire of green wood and dry sticks, and could economize my camphor.',
        'Their voices seemed to rise to a higher pitch of excitement, and their movements grew faster.',
        'I bit myself and screamed in a passionate desire to awake.',
        'Very calmly I tried to strike the match.',
        'It had come to rest again in the north-west, against the wall where you saw it.',
        "I took my eyes off the Time Traveller's face, and looked round at his audience.",
    ]),
    # Thomas More, Utopia (1516; Gilbert Burnet's English translation, 1684)
    # text: github.com/Rickisteiner/BooksDesign utopia.txt
    ("Thomas More, Utopia (1516; Gilbert Burnet's English translation, 1684)", [
        'Now I live as I will, to which I believe few courtiers can pretend.',
        'And to this last, a man of a great mind is much sooner drawn than to the former.',
        'Would you give way to it?',
        'Another proposes the hiring the Germans, and the securing the Switzers by pensions.',
        'Their buildings are good, and are so uniform that a whole side of a street looks like one house.',
        'They give their voices secretly, so that it is not known for whom everyone gives his suffrage.',
        'The Prince is for life, unless he is removed upon suspicion of some design to enslave the people.',
        "They then sup, and at eight o'clock, counting from noon, go to bed and sleep eight hours.",
        'In these halls they all meet and have their repasts.',
        'Whether in some one thing, or in a great many?',
        "Will the bending another man's knees give ease to yours?",
        "And will the head's being bare cure the madness of yours?",
        'Some have thought that there was no pleasure but what was excited by some sensible motion in the body.',
        'And what is delight but another name for pleasure?',
        'And thus these pleasant as well as proper gifts of nature maintain the strength and the sprightliness of our bodies.',
        "They esteem Plutarch highly, and were much taken with Lucian's wit and with his pleasant way of writing.",
        'If such a thing is discovered after marriage, a man has no remedy but patience.',
        'They therefore think it is reasonable that there should be good provision made against such mischievous frauds.',
        'They have but few laws, and such is their constitution that they need not many.',
        'They are hardened both against heat, cold, and labor, and know nothing of the delicacies of life.',
        'They do not apply themselves to agriculture, nor do they care either for their houses or their clothes.',
        'It is hard to tell whether they are more dexterous in laying or avoiding ambushes.',
        'Others fell and cleave timber, and bring wood, corn, and other necessaries on carts into their towns.',
        'There is nothing in which they are more cautious than in giving their opinion positively concerning any sort of religion.',
    ]),
    # Thomas Jefferson, Second Inaugural Address (1805), US government text
    # text: github.com/Vector2word/gensim-model 1801-Jefferson.txt (mislabelled: it is the 1805 address)
    ('Thomas Jefferson, Second Inaugural Address (1805), US government text', [
        'At home, fellow citizens, you best know whether we have done well or ill.',
        'The suppression of unnecessary offices, of useless establishments and expenses, enabled us to discontinue our internal taxes.',
        'But who can limit the extent to which the federative principle may operate effectively?',
        'With which should we be most likely to live in harmony and friendly intercourse?',
        'The aboriginal inhabitants of these countries I have regarded with the commiseration their history inspires.',
        'In giving these outlines I do not mean, fellow citizens, to arrogate to myself the merit of the measures.',
        'When satisfied of these views it is not in human nature that they should not approve and support them.',
    ]),
    # Abraham Lincoln, First Inaugural Address (1861), US government text
    # text: github.com/Vector2word/gensim-model 1861-Lincoln.txt
    ('Abraham Lincoln, First Inaugural Address (1861), US government text', [
        'Indeed, the most ample evidence to the contrary has all the while existed and been open to their inspection.',
        'I believe I have no lawful right to do so, and I have no inclination to do so.',
        'It is seventy-two years since the first inauguration of a President under our National Constitution.',
        'During that period fifteen different and greatly distinguished citizens have in succession administered the executive branch of the Government.',
        'They have conducted it through many perils, and generally with great success.',
        'I hold that in contemplation of universal law and of the Constitution the Union of these States is perpetual.',
        'Perpetuity is implied, if not expressed, in the fundamental law of all national governments.',
        'To those, however, who really love the Union may I not speak?',
        'All profess to be content in the Union if all constitutional rights can be maintained.',
        'Is it true, then, that any right plainly written in the Constitution has been denied?',
        'Happily, the human mind is so constituted that no party can reach to the audacity of doing this.',
        'But such is not our case.',
        'May Congress prohibit slavery in the Territories?',
        'From questions of this class spring all our constitutional controversies, and we divide upon them into majorities and minorities.',
        'If the minority will not acquiesce, the majority must, or the Government must cease.',
        'There is no other alternative, for continuing the Government is acquiescence on one side or the other.',
        'All who cherish disunion sentiments are now being educated to the exact temper of doing this.',
        'Plainly the central idea of secession is the essence of anarchy.',
        'Nor is there in this view any assault upon the court or the judges.',
        'This is the only substantial dispute.',
        'They can not but remain face to face, and intercourse, either amicable or hostile, must continue between them.',
        'Is it possible, then, to make that intercourse more advantageous or more satisfactory after separation than before?',
        'Can treaties be more faithfully enforced between aliens than laws can among friends?',
        'This country, with its institutions, belongs to the people who inhabit it.',
        'Why should there not be a patient confidence in the ultimate justice of the people?',
        'In your hands, my dissatisfied fellow-countrymen, and not in mine, is the momentous issue of civil war.',
        'The Government will not assail you.',
        'You can have no conflict without being yourselves the aggressors.',
        'We must not be enemies.',
        'Though passion may have strained it must not break our bonds of affection.',
    ]),
    # Theodore Roosevelt, Inaugural Address (1905), US government text
    # text: github.com/Vector2word/gensim-model 1905-Teodore-Roosevelt.txt
    ('Theodore Roosevelt, Inaugural Address (1905), US government text', [
        'Much has been given us, and much will rightfully be expected from us.',
        'We have duties to others and duties to ourselves; and we can shirk neither.',
        'Toward all other nations, large and small, our attitude must be one of cordial and sincere friendship.',
        'While ever careful to refrain from wrongdoing others, we must be no less insistent that we are not wronged ourselves.',
        'We wish peace, but we wish the peace of justice, the peace of righteousness.',
        'We wish it because we think it is right and not because we are afraid.',
        'Our relations with the other powers of the world are important; but still more important are our relations among ourselves.',
        'Power invariably means both responsibility and danger.',
        'Our forefathers faced certain perils which we have outgrown.',
        'We now face other perils, the very existence of which it was impossible that they should foresee.',
        'We know that self-government is difficult.',
        'But we have faith that we shall not prove false to the memories of the men of the mighty past.',
        'They did their work, they left us the splendid heritage we now enjoy.',
    ]),
]

PROSE: list[str] = [s for _, sents in _BLOCKS for s in sents]
PROSE_SOURCE: list[str] = [work for work, sents in _BLOCKS for _ in sents]

# --------------------------------------------------------------------------- numbers and names

TRAINING_NAMES = frozenset("Anna Peter Maria John Clara Thomas Lucy Henry Emma Oliver Sarah Daniel Grace Martin Helen".split())

FIRST_NAMES = """Margaret William Elizabeth George Charlotte Samuel Rebecca Arthur Beatrice Edward Florence
Frederick Harriet Isaac Josephine Leonard Matilda Nathaniel Penelope Raymond Rosalind Theodore Victoria
Walter Winifred Abigail Benjamin Cecilia Dorothy Eleanor Francis Gregory Hannah Julia Kenneth Lillian
Miriam Nicholas Patrick Quentin Rachel Simon Teresa Ursula Vincent Wendy Zachary Akira Fatima Ingrid
Mateo Priya Sergei Ngozi Kwame Lars Giulia Aisha Dmitri Rafael Mei Oscar Agnes Hugo Esther Felix""".split()
SURNAMES = """Thompson Okafor Lindqvist Moreau Kowalski Fitzgerald Nakamura Hernandez Brennan Whitaker Sullivan
Abernathy Castillo Novak Patel Rasmussen Delacroix Haverford Mensah Takahashi Ivanova Gallagher Pemberton
Osei Schneider Rossi Campbell Dubois Andersen Yamamoto""".split()
PLACES = """Boston Chicago Denver Seattle Edinburgh Dublin Lisbon Vienna Toronto Melbourne Nairobi Cairo Madrid
Oslo Prague Montreal Glasgow Liverpool Sacramento Baltimore Philadelphia Manchester Bristol Cardiff Auckland
Kyoto Mumbai Helsinki Warsaw Copenhagen Pittsburgh Minneapolis Vancouver Brisbane Lagos Santiago""".split()
STREETS = "Baker Elm Maple Harbor Queen Mill Chestnut Willow Station Kingsley Garfield Primrose".split()
MONTHS = "January February March April May June July August September October November December".split()
WEEKDAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
ITEMS = ["oranges", "notebooks", "light bulbs", "tickets", "chairs", "candles", "loaves of bread",
         "bottles of milk", "pencils", "tins of paint", "umbrellas", "postage stamps"]

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "zero ten twenty thirty forty fifty sixty seventy eighty ninety".split()
_ORD = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
        "nine": "ninth", "twelve": "twelfth"}


def number_words(n: int) -> str:
    """0 <= n < 1,000,000 in words, British-style 'and' after hundreds, no hyphens:
    342 -> 'three hundred and forty two'."""
    if not 0 <= n < 1_000_000:
        raise ValueError(n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))
    rest = n % 1000
    head = number_words(n // 1000) + " thousand"
    if rest == 0:
        return head
    return head + (" and " if rest < 100 else " ") + number_words(rest)


def ordinal_words(n: int) -> str:
    """1 -> 'first', 22 -> 'twenty second', 30 -> 'thirtieth'."""
    words = number_words(n).split()
    last = words[-1]
    if last in _ORD:
        words[-1] = _ORD[last]
    elif last.endswith("y"):
        words[-1] = last[:-1] + "ieth"
    else:
        words[-1] = last + "th"
    return " ".join(words)


def year_words(y: int) -> str:
    """1984 -> 'nineteen eighty four', 1905 -> 'nineteen oh five', 1900 -> 'nineteen hundred',
    2000 -> 'two thousand', 2007 -> 'two thousand and seven', 2015 -> 'twenty fifteen'."""
    if 2000 <= y < 2010:
        return "two thousand" + ("" if y == 2000 else " and " + _ONES[y - 2000])
    hi, lo = divmod(y, 100)
    if lo == 0:
        return number_words(hi) + " hundred"
    return number_words(hi) + " " + (("oh " + _ONES[lo]) if lo < 10 else number_words(lo))


_PARTS = {"morning": ("in the morning", 6, 11), "afternoon": ("in the afternoon", 1, 4),
          "evening": ("in the evening", 5, 10), "any": ("", 1, 12)}


def time_words(r: random.Random, part: str | None = None) -> str:
    """'half past seven in the evening', 'a quarter to nine', 'ten oh five in the morning'."""
    part, lo, hi = _PARTS[part] if part else r.choice(list(_PARTS.values()))
    h = r.randint(lo, hi)
    m = r.choice([0, 0, 5, 10, 15, 20, 30, 30, 40, 45, 50])
    if m == 0:
        t = f"{number_words(h)} o'clock"
    elif m == 15:
        t = f"a quarter past {number_words(h)}"
    elif m == 30:
        t = f"half past {number_words(h)}"
    elif m == 45:
        t = f"a quarter to {number_words(h % 12 + 1)}"
    else:
        t = f"{number_words(h)} {number_words(m) if m >= 10 else 'oh ' + number_words(m)}"
    return (t + " " + part).strip()


def money_words(r: random.Random, big: bool = False, most: int = 480) -> str:
    if big:
        return f"{number_words(r.randint(2, 950) * 1000)} dollars"
    d, c = r.randint(1, most), r.choice([0, 0, 5, 10, 25, 50, 75, 99, r.randint(1, 99)])
    dollars = f"{number_words(d)} dollar{'s' if d != 1 else ''}"
    return dollars if c == 0 else f"{dollars} and {number_words(c)} cent{'s' if c != 1 else ''}"


def digits_words(r: random.Random, groups=(3, 3, 4)) -> str:
    return ", ".join(" ".join(_ONES[r.randint(0, 9)] for _ in range(g)) for g in groups)


def _templates(r: random.Random):
    nm, nm2 = r.sample(FIRST_NAMES, 2)
    sur = r.choice(SURNAMES)
    pl, pl2 = r.sample(PLACES, 2)
    mon, day = r.choice(MONTHS), r.choice(WEEKDAYS)
    dom = ordinal_words(r.randint(1, 28 if mon == "February" else 30))
    y1 = r.randint(1850, 2024)
    y2 = y1 + r.randint(3, 40)
    n = lambda a, b: number_words(r.randint(a, b))  # noqa: E731
    return [
        f"On the {dom} of {mon}, {nm} paid {money_words(r)} in {pl}.",
        f"{nm} {sur} was born in {pl} in {year_words(y1)}.",
        f"The train to {pl} leaves at {time_words(r)} from platform {n(1, 14)}.",
        f"{nm} ordered {n(2, 60)} {r.choice(ITEMS)} for {money_words(r, most=90)}.",
        f"Flight {n(100, 999)} to {pl} is delayed by {n(10, 95)} minutes.",
        f"{nm} {sur} lives at number {n(1, 240)} {r.choice(STREETS)} Street in {pl}.",
        f"The population of {pl} grew by {n(2, 45)} percent between {year_words(y1)} and {year_words(min(y2, 2024))}.",
        f"Please call {nm} back on {digits_words(r)}.",
        f"The meeting with {nm} {sur} has moved to {day}, the {dom} of {mon}, at {time_words(r)}.",
        f"{nm} ran {n(2, 26)} miles in {n(1, 4)} hours and {n(2, 59)} minutes.",
        f"A return ticket from {pl} to {pl2} costs {money_words(r)}.",
        f"{nm} turned {n(18, 96)} years old on {day}, and {nm2} baked a cake.",
        f"In {year_words(y1)}, {nm} {sur} sold {n(3, 900)} acres near {pl} for {money_words(r, big=True)}.",
        f"The temperature in {pl} fell to minus {n(2, 35)} degrees on {day} night.",
        f"{nm} and {nm2} first met in {pl} at {time_words(r)} on the {dom} of {mon}.",
        f"Room {n(101, 999)} is on the {ordinal_words(r.randint(1, 30))} floor, next to the office of {nm} {sur}.",
        f"The recipe needs {n(2, 12)} eggs, {r.choice(['half a cup', 'a third of a cup', 'a quarter of a cup', 'three quarters of a cup'])} of sugar and {n(50, 500)} grams of butter.",
        f"{nm} drove {n(40, 900)} kilometres from {pl} to {pl2} in {n(1, 11)} hours.",
        f"Between {year_words(y1)} and {year_words(min(y2, 2024))}, {nm} wrote {n(2, 40)} books and {n(20, 900)} letters.",
        f"The museum in {pl} opens at {time_words(r, 'morning')} and closes at {time_words(r, r.choice(['afternoon', 'evening']))} on {day}s.",
        f"{nm} {sur} scored {n(50, 100)} out of one hundred, and {nm2} scored {n(20, 99)}.",
        f"Order number {digits_words(r, (4,))} for {nm} {sur} will arrive on the {dom} of {mon}.",
        f"Her grandmother, {nm} {sur}, moved to {pl} in {year_words(y1)} with {n(2, 9)} children.",
        f"The bill came to {money_words(r)}, so {nm} left a tip of {n(2, 30)} dollars.",
    ]


def numbers_and_names(seed: int, n: int) -> list[str]:
    """``n`` distinct sentences, deterministic in ``seed`` (``random.Random(seed)``; same result
    on every machine and Python 3 version)."""
    r = random.Random(seed)
    out: dict[str, None] = {}
    if n <= 0:
        return []
    for _ in range(max(100, n * 50)):
        t = r.choice(_templates(r))
        out.setdefault(t, None)
        if len(out) == n:
            return list(out)
    raise RuntimeError(f"could not make {n} distinct sentences")
