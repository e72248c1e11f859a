"""The model cards' own examples (intfloat/e5-small-v2, multilingual-e5-*, multilingual-e5-large-instruct)."""

PROTEIN = ("As a general guideline, the CDC's average requirement of protein for women ages 19 to 70 is 46 grams "
           "per day. But, as you can see from this chart, you'll need to increase that if you're expecting or "
           "training for a marathon. Check out the chart below to see how much protein you should be eating each day.")
SUMMIT = ("Definition of summit for English Language Learners. : 1  the highest point of a mountain : the highest "
          "level : 2  the most important part of... : a meeting or series of meetings between the leaders of two or "
          "more governments.")
PUMPKIN = ("1.清炒南瓜丝 原料:嫩南瓜半个 调料:葱、盐、白糖、鸡精 做法: 1、南瓜用刀薄薄的削去表面一层皮,用勺子刮去瓤 "
           "2、擦成细丝(没有擦菜板就用刀慢慢切成细丝) 3、锅烧热放油,入葱花煸出香味 4、入南瓜丝快速翻炒一分钟左右,"
           "放盐、一点白糖和鸡精调味出锅 2.香葱炒南瓜 原料:南瓜1只 调料:香葱、蒜末、橄榄油、盐 做法: 1、将南瓜去皮,"
           "切成片 2、油锅8成热后,入蒜末爆香 3、入南瓜片快速翻炒,加入香葱、盐调味出锅")

EN_QUERIES = ["how much protein should a female eat", "summit define"]
EN_PASSAGES = [PROTEIN, SUMMIT]
ML_QUERIES = ["how much protein should a female eat", "南瓜的家常做法"]
ML_PASSAGES = [PROTEIN, PUMPKIN]
INSTRUCT_TASK = "Given a web search query, retrieve relevant passages that answer the query"
INSTRUCT_SCORES = [[91.92852783203125, 67.580322265625], [70.3814468383789, 92.1330795288086]]
